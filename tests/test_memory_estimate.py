"""finetuning_dir/memory_estimate.py: parameters counted from real Phi configs, the method auto picks for a
GPU's size, the sentences of a refusal, and the estimate the demo's job printed."""

import re

import pytest

from finetuning_dir import memory_estimate as m

# The published configs (config.json on the Hub), the fields the estimate reads.
PHI_3_5_MINI = {"vocab_size": 32064, "hidden_size": 3072, "num_hidden_layers": 32, "intermediate_size": 8192,
                "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False}
PHI_3_MINI_4K = dict(PHI_3_5_MINI)  # the same shape; a 4k context instead of LongRoPE's 128k
PHI_4_MINI = {"vocab_size": 200064, "hidden_size": 3072, "num_hidden_layers": 32, "intermediate_size": 8192,
              "num_attention_heads": 24, "num_key_value_heads": 8, "tie_word_embeddings": True}
GIB = m.GIB


@pytest.mark.parametrize("config, billions", [(PHI_3_5_MINI, 3.821), (PHI_3_MINI_4K, 3.821), (PHI_4_MINI, 3.836)])
def test_parameters_match_the_published_sizes(config, billions):
    # Microsoft's model cards: Phi-3.5-mini 3.8B, Phi-4-mini 3.8B (its tied 200k embedding counted once).
    assert m.parameter_counts(m.shape(config))["total"] / 1e9 == pytest.approx(billions, abs=0.001)


def estimates(config, length=2048, batch=4, bf16=True):
    """Every method's estimate at the tutorial's length and batch."""
    return {method: m.estimate(config, method, length, batch, bf16) for method in m.METHODS}


def test_full_fine_tuning_costs_eight_bytes_a_parameter_in_bf16():
    parts = estimates(PHI_3_5_MINI)["full"]
    assert parts["weights"] == parts["gradients"] == 2 * parts["parameters"]
    assert parts["optimizer"] == 4 * parts["parameters"]  # AdamW's two moments in the parameters' dtype
    assert 30 * GIB < parts["total"] < 45 * GIB


def test_lora_and_qlora_train_a_small_share_and_qlora_stores_four_bits():
    parts = estimates(PHI_3_5_MINI)
    assert parts["lora"]["trainable"] == parts["qlora"]["trainable"] < parts["full"]["trainable"] / 100
    assert parts["qlora"]["weights"] < parts["lora"]["weights"] / 3
    assert parts["qlora"]["total"] < parts["lora"]["total"] < parts["full"]["total"]


def test_phi4s_large_vocabulary_shows_in_the_logits():
    assert estimates(PHI_4_MINI)["full"]["logits"] > 5 * estimates(PHI_3_5_MINI)["full"]["logits"]


@pytest.mark.parametrize("config, gib, method", [
    (PHI_3_5_MINI, 80, "full"),  # the tutorial's A100: its full fine-tune
    (PHI_3_5_MINI, 24, "lora"),  # a 24 GB workstation GPU
    (PHI_3_5_MINI, 16, "lora"),
    (PHI_4_MINI, 80, "full"),
    (PHI_4_MINI, 24, "qlora"),  # the 200k-vocabulary logits push LoRA past 24 GB
])
def test_auto_picks_the_most_faithful_method_that_fits(config, gib, method):
    chosen, why = m.choose_method("auto", estimates(config), gib * GIB, True, f"a {gib} GiB GPU")
    assert chosen == method and why.startswith(f"auto chose {method}: ")
    for skipped in m.METHODS[:m.METHODS.index(method)]:
        assert f"{skipped} needs" in why and f"more than a {gib} GiB GPU" in why


def test_a_method_that_does_not_fit_is_refused_before_loading_naming_one_that_does():
    with pytest.raises(m.MethodError, match=r"^full needs ~.* GiB and a 24 GiB GPU has less: use lora \(~.* GiB\)\.$"):
        m.choose_method("full", estimates(PHI_3_5_MINI), 24 * GIB, True, "a 24 GiB GPU")


def test_nothing_fits_says_what_to_change():
    with pytest.raises(m.MethodError, match="No method fits.*lower --max-length or --batch-size"):
        m.choose_method("auto", estimates(PHI_4_MINI), 12 * GIB, True, "a 12 GiB GPU")


def test_qlora_without_cuda_is_one_sentence_naming_what_fits():
    with pytest.raises(m.MethodError, match=r"needs a CUDA GPU .* use lora or full; full fits in this machine"):
        m.choose_method("qlora", estimates(PHI_3_5_MINI, bf16=False), 1000 * GIB, False, "this machine")
    chosen, _ = m.choose_method("auto", estimates(PHI_3_5_MINI), 1 * GIB * 30, False, "this machine")
    assert chosen == "lora"  # auto never picks qlora without CUDA


def test_the_report_has_one_row_a_method():
    table = m.report(estimates(PHI_4_MINI), "an 80 GiB GPU")
    assert table.splitlines()[0] == "Memory estimate (GiB) against an 80 GiB GPU:"
    assert [line.split()[0] for line in table.splitlines()[2:]] == list(m.METHODS)


@pytest.mark.slow
def test_the_demo_job_printed_its_estimate_and_method(demo_run):
    assert "Memory estimate (GiB) against this machine's available memory" in demo_run.stdout
    assert "Method: auto chose full: full needs" in demo_run.stdout
    peak, estimated = map(float, re.search(r"memory\s+peak ([\d.]+) GiB measured, ([\d.]+) GiB estimated",
                                           demo_run.stdout).groups())
    assert estimated == pytest.approx(peak, rel=0.20)  # the tiny model's run, measured against its estimate


# Peaks measured on this machine's CPU (fine_tune.py's own phases to the end of training; the process's peak
# resident set) on SmolLM2-135M-Instruct, fp32, rows of 142 tokens (the longest sample chat), 2026-12-06:
# (method, batch, gradient checkpointing, GiB). docs/benchmarks.md section 7; tests/test_real_model.py measures a
# live run against the same bound.
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True}
CPU_PEAKS = [("lora", 4, False, 3.41), ("lora", 8, False, 5.65), ("lora", 16, False, 8.91), ("full", 8, False, 4.70),
             ("lora", 8, True, 3.54)]


@pytest.mark.parametrize("method, batch, checkpointing, measured_gib", CPU_PEAKS)
def test_the_cpu_estimate_is_within_20_percent_of_the_measured_peak(method, batch, checkpointing, measured_gib):
    total = m.estimate(SMOLLM2_135M, method, 142, batch, bf16=False, gradient_checkpointing=checkpointing,
                       has_cuda=False)["total"]
    assert total / GIB == pytest.approx(measured_gib, rel=0.20)
