"""What scripts/serve prints: how to chat with the demo configuration right away."""

from __future__ import annotations

import time

import jwt

from .config import Config


def print_demo_help(config: Config, listen: str, web_listen: str = "") -> None:
    port = listen.rsplit(":", 1)[-1]
    addr = f"localhost:{port}"
    agent = config.agents[0] if config.agents else None
    queue = config.queues[0].id if config.queues else "QUEUE"
    token = ""
    if config.identity_secrets:
        token = jwt.encode(
            # As long-lived as the configuration allows (the demo's: a day), so the printed link keeps working.
            {
                "name": "Ada Lovelace",
                "email": "ada@example.com",
                "iat": int(time.time()),
                "exp": int(time.time() + min(86400.0, config.security.identity_max_lifetime)),
            },
            config.identity_secrets[0],
            algorithm="HS256",
        )
    lines = [""]
    if web_listen:
        page = f"http://localhost:{web_listen.rsplit(':', 1)[-1]}/"
        lines += [
            f"Customer chat page: open {page} in a browser, pick a queue and start a chat.",
            "Or chat as a customer the hosting site signed in (the demo identity token: verified name and e-mail):",
            f"  {page}#identity_token={token}" if token else "  (none: the configuration has no identity secret)",
            "",
        ]
    lines += [
        "Or chat as a customer in a terminal:",
        f"  .venv/bin/queuechat-customer --server {addr} --queue {queue} --name Ada",
        "",
    ]
    if agent:
        lines += [
            "Answer as an agent in the terminal desktop (another terminal):",
            f"  .venv/bin/queuechat-agent --server {addr} ui --username {agent.id} --profile {agent.profiles[0]}",
            f"  (password: {agent.password}; the footer shows the keys), or with the grpcurl calls below.",
            "",
        ]
    lines += [
        f"queuechat demo on {addr} (gRPC, reflection on). With grpcurl:",
        "",
        "  # 1. an agent logs in (ready) and opens the offer stream",
    ]
    if agent:
        lines += [
            f"  grpcurl -plaintext -d '{{\"username\":\"{agent.id}\",\"password\":\"{agent.password}\","
            f"\"profile_id\":\"{agent.profiles[0]}\",\"ready\":true}}' {addr} chat.v1.AgentService/Login",
            f"  grpcurl -plaintext -H 'authorization: Bearer <session_token>' {addr} chat.v1.AgentService/StreamOffers",
        ]
    lines += [
        "",
        "  # 2. a customer starts a chat (the demo identity token makes name and e-mail authenticated)",
        f"  grpcurl -plaintext -d '{{\"queue_id\":\"{queue}\",\"variables\":{{\"topic\":\"billing\"}}"
        + (f",\"identity_token\":\"{token}\"" if token else "")
        + f"}}' {addr} chat.v1.CustomerService/StartChat",
        "",
        "  # 3. the agent accepts the offer, then both stream and send",
        "  grpcurl -plaintext -H 'authorization: Bearer <session_token>'"
        f" -d '{{\"offer_id\":\"<offer_id>\"}}' {addr} chat.v1.AgentService/AcceptOffer",
        "  grpcurl -plaintext -H 'authorization: Bearer <customer_token>'"
        f" -d '{{\"conversation_id\":\"<id>\"}}' {addr} chat.v1.CustomerService/StreamConversation",
        "  grpcurl -plaintext -H 'authorization: Bearer <customer_token>'"
        f" -d '{{\"conversation_id\":\"<id>\",\"text\":\"Hello!\"}}' {addr} chat.v1.CustomerService/SendMessage",
        "",
        "  Demo agents: " + ", ".join(f"{a.id}/{a.password} ({', '.join(a.profiles)})" for a in config.agents),
        "  Demo admin:  " + ", ".join(f"{a.id}/{a.password}" for a in config.admins),
        "  More in docs/api.md.",
        "",
    ]
    print("\n".join(lines), flush=True)
