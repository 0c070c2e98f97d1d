"""The sample customer client: `queuechat-customer`, a chat in a queue from the terminal.

client.py is the asyncio client library on the generated chat.v1 stubs (CustomerService only);
text.py turns events into lines; identity.py signs the demo identity token; cli.py is the command.
Nothing here imports the agent client or Textual.
"""
