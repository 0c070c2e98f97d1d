def main() -> int:
    raise SystemExit("queuechat-agent: not built yet")
