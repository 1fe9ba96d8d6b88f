"""Microsoft Agent Framework's OpenAI-compatible chat client asks the local endpoint one question, then a follow-up.

    AGENT_BASE_URL=http://127.0.0.1:5001/v1 AGENT_API_KEY=<key> python tests/agent_framework_chat.py "Who founded Microsoft?"

Prints {"answer": ..., "follow_up": ...} as JSON. tests/test_local_endpoint.py runs it in a venv of its own, built
from tests/agent_framework_requirements.txt: agent-framework-core needs opentelemetry-api >= 1.39 and promptflow
1.18.5 pins < 1.39, so it cannot run in the project's venv. The key comes from the environment, never argv.
"""

import asyncio
import json
import os
import sys

from agent_framework.openai import OpenAIChatCompletionClient  # the Chat Completions API (OpenAIChatClient: Responses)

FOLLOW_UP = "Where is its headquarters today?"


async def ask(question):
    """The agent's answer to `question`, then to a follow-up in the same session (the history goes along)."""
    client = OpenAIChatCompletionClient(model="phi-fine-tuned", api_key=os.environ["AGENT_API_KEY"],
                                        base_url=os.environ["AGENT_BASE_URL"])
    agent = client.as_agent(name="phi")
    session = agent.create_session()
    first = await agent.run(question, session=session)
    second = await agent.run(FOLLOW_UP, session=session)
    return {"answer": first.text, "follow_up": second.text}


def main():
    """Ask, print the answers as JSON."""
    question = sys.argv[1] if len(sys.argv) > 1 else "Who founded Microsoft?"
    print(json.dumps(asyncio.run(ask(question))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
