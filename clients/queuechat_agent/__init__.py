"""The sample agent client: a terminal desktop with one tab per chat, and a scriptable mode.

client.py is the asyncio client library on the generated chat.v1 stubs; app.py
(with panes.py and dialogs.py) the Textual desktop on it; cli.py the command line.
"""
