"""The README's quick start, with the official openai SDK: one chat call through the agent.

Reads the client key from $SWITCHGEAR_API_KEY and the front door's port from $HTTP_PORT.
"""

import os

from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{os.environ.get('HTTP_PORT', '8080')}/v1",
                api_key=os.environ["SWITCHGEAR_API_KEY"])
answer = client.chat.completions.create(model="quickstart-chat", messages=[{"role": "user", "content": "hi"}])
print(answer.choices[0].message.content)
