"""Fault injection for the interruption tests: a power cut or a full disk at one named point of a step.

Python imports `sitecustomize` at start-up from sys.path; the tests put this folder first on PYTHONPATH, so every
process of a step (the step itself, the local job, the endpoint server) runs this, and nothing in the project's
code knows about it. FINETUNE_PHI_FAULT says what happens where:

    kill:before:stand_ins.deployment:publish     SIGKILL (a power cut) just before the call
    kill:after:stand_ins.endpoint_process:start  ... just after it returns
    kill:after:helpers.files:atomic_write_text:3 ... just after the third call returns
    full:before:helpers.files:write_generated_file
                                                 from that call on, this process can write no file past
                                                 FINETUNE_PHI_FAULT_BYTES (default 0: none at all; RLIMIT_FSIZE,
                                                 so the kernel refuses the write as on a full disk)

The function is replaced in its module's namespace as soon as that module has been imported, so the module that
calls it must look it up there (the form `module:function` names the caller's binding). FINETUNE_PHI_FAULT_MAIN
(optional) limits the fault to processes whose main script ends with that name.
"""

import importlib.abc
import importlib.machinery
import os
import signal
import sys

FAULT = os.environ.get("FINETUNE_PHI_FAULT", "")


def _fault(kind):
    """Do the fault now."""
    if kind == "kill":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "full":
        import resource

        limit = int(os.environ.get("FINETUNE_PHI_FAULT_BYTES", "0"))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _wrap(function, kind, when, nth=1):
    """`function` with the fault before or after its `nth` call."""
    calls = []

    def faulty(*args, **kwargs):
        calls.append(1)
        if when == "before" and len(calls) == nth:
            _fault(kind)
        result = function(*args, **kwargs)
        if when == "after" and len(calls) == nth:
            _fault(kind)
        return result

    return faulty


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Replace module:function once `module` has run."""

    def __init__(self, module, function, kind, when, nth):
        self.module, self.function, self.kind, self.when, self.nth = module, function, kind, when, nth

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, finder = spec.loader, self

        class Loader(importlib.abc.Loader):
            def __getattr__(self, name):  # get_code, is_package, ...: `python -m` asks the loader for them
                return getattr(loader, name)

            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                setattr(module, finder.function,
                        _wrap(getattr(module, finder.function), finder.kind, finder.when, finder.nth))

        spec.loader = Loader()
        return spec


def _install():
    """Read FINETUNE_PHI_FAULT and hook the named function."""
    main = os.environ.get("FINETUNE_PHI_FAULT_MAIN", "")
    if not FAULT or (main and not (sys.argv and sys.argv[0].endswith(main))):
        return
    kind, when, module, function, *nth = FAULT.split(":")
    nth = int(nth[0]) if nth else 1
    if module in sys.modules:
        target = sys.modules[module]
        setattr(target, function, _wrap(getattr(target, function), kind, when, nth))
    else:
        sys.meta_path.insert(0, _PatchOnImport(module, function, kind, when, nth))


_install()
