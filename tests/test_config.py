"""The configuration file: strict validation, messages that say where and what, environment overrides."""

import copy
import dataclasses
from pathlib import Path

import pytest
from harness import base_config

from queuechat.config import ConfigError, Limits, Settings, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def refused(doc, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(doc, environ)
    assert str(e.value) == "\n".join(e.value.problems)
    return list(e.value.problems)


def one_problem(doc, environ=None) -> str:
    problems = refused(doc, environ)
    assert len(problems) == 1, problems
    return problems[0]


def test_the_demo_config_loads():
    cfg = load_config(ROOT / "config/demo.toml", environ={})
    assert [q.id for q in cfg.queues] == ["sales", "support"]
    assert [a.id for a in cfg.agents] == ["alice", "bob", "carol", "erin"]
    assert [p.id for p in cfg.profiles if p.supervisor] == ["team-leads"]  # erin's
    assert [(c.id, c.queue) for c in cfg.wrap_up_codes] == [("solved", None), ("sold", "sales"), ("escalated", "support")]
    assert cfg.agents[1].max_chats == 2 and cfg.agents[0].max_chats == 3
    assert cfg.predefined_messages[3].profile == "support-only"
    assert cfg.identity_secrets == ["demo-identity-secret-change-me-0123456789"]
    # The demo names no settings, so AdminService changes survive restarts.
    assert cfg.settings == Settings() and cfg.settings_given == frozenset()
    assert cfg.limits == Limits()


def test_the_test_harness_config_parses_as_before():
    cfg = parse_config(base_config())
    assert cfg.settings == Settings(offer_timeout=30.0, reject_cooldown=30.0, stream_grace=0.5)
    assert cfg.settings_given == {"offer_timeout", "reject_cooldown", "stream_grace"}
    assert cfg.limits.heartbeat_interval == 0.5 and cfg.limits.max_message_chars == 4000
    assert (cfg.argon2_time_cost, cfg.argon2_memory_kib) == (1, 1024)
    assert cfg.agents[0].profiles == ["both", "sales", "support"] and cfg.agents[0].password == "pw1"
    assert cfg.predefined_messages[1].queue == "sales" and cfg.predefined_messages[1].profile is None


def test_parse_config_leaves_the_document_alone():
    doc = base_config()
    before = copy.deepcopy(doc)
    parse_config(doc, {"QUEUECHAT_SETTINGS__OFFER_TIMEOUT": "5"})
    assert doc == before


def test_an_empty_document_gives_the_defaults():
    cfg = parse_config({})
    assert cfg.settings == Settings(30, 30, 10) and cfg.limits == Limits() and cfg.agents == []
    assert (cfg.argon2_time_cost, cfg.argon2_memory_kib) == (3, 65536)


def test_settings_are_built_without_a_range_check():
    # AdminService.UpdateSettings checks the range itself and answers INVALID_ARGUMENT.
    assert Settings(offer_timeout=-1.0, reject_cooldown=0.0, stream_grace=1e9).offer_timeout == -1.0
    assert Settings(**{"stream_grace": 2.0}) == Settings(30.0, 30.0, 2.0)
    assert dataclasses.replace(Settings(), offer_timeout=5.0).offer_timeout == 5.0


def test_an_int_is_a_number_but_a_number_is_not_an_integer():
    assert parse_config(base_config(settings={"offer_timeout": 5})).settings.offer_timeout == 5.0
    msg = one_problem(base_config(limits={"max_message_chars": 4000.0}))
    assert msg == "[limits] max_message_chars: expected an integer, got a number 4000.0"


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("limits", "max_message_chars", "4000", "[limits] max_message_chars: expected an integer, got a string '4000'"),
        ("limits", "upload_ttl", "1h", "[limits] upload_ttl: expected a number, got a string '1h'"),
        ("limits", "subscriber_queue", True, "[limits] subscriber_queue: expected an integer, got a boolean True"),
        ("settings", "offer_timeout", "30", "[settings] offer_timeout: expected a number, got a string '30'"),
        ("security", "argon2_time_cost", [1], "[security] argon2_time_cost: expected an integer, got an array"),
    ],
)
def test_a_wrong_type_names_the_key_and_what_was_expected(section, key, value, expected):
    assert one_problem(base_config(**{section: {key: value}})) == expected


def test_a_string_where_a_list_belongs_is_refused():
    doc = base_config()
    doc["agents"][2]["profiles"] = "both"
    assert one_problem(doc) == "agents[2].profiles: expected a list of strings, got a string 'both'"
    doc = base_config()
    doc["profiles"][0]["queues"] = ["sales", 7]
    assert one_problem(doc) == "profiles[0].queues[1]: expected a string, got an integer 7"


def test_a_secret_of_the_wrong_type_is_not_repeated():
    msg = one_problem(base_config(security={"identity_secrets": "hunter2-secret"}))
    assert msg == "[security] identity_secrets: expected a list of strings, got a string"
    doc = base_config()
    doc["admins"][0]["password"] = 123456
    assert one_problem(doc) == "admins[0].password: expected a string, got an integer"


def test_an_unknown_key_at_the_top_level_is_refused():
    msg = one_problem({**base_config(), "setting": {"offer_timeout": 5}})
    assert msg.startswith("setting: unknown key; expected one of settings, limits, security, rate_limits, cluster, queues,")


def test_an_unknown_key_in_a_section_is_refused():
    msg = one_problem(base_config(settings={"offer_timout": 5}))
    assert msg == "[settings] offer_timout: unknown key; expected one of offer_timeout, reject_cooldown, stream_grace, rating_window"
    msg = one_problem(base_config(security={"identity_secret": "x"}))
    assert msg.startswith("[security] identity_secret: unknown key; expected one of identity_secrets,")


def test_an_unknown_key_in_a_list_item_is_refused():
    doc = base_config()
    doc["agents"][1]["max_chat"] = 2
    msg = one_problem(doc)
    assert msg == (
        "agents[1].max_chat: unknown key; "
        "expected one of id, display_name, profiles, password, password_hash, max_chats, disabled"
    )


def test_a_section_of_the_wrong_shape_is_refused():
    assert one_problem({"settings": 5}) == "[settings]: expected a table [settings], got an integer 5"
    assert one_problem({"queues": {"id": "x"}}) == "queues: expected an array of tables [[queues]], got a table"
    assert one_problem({"queues": ["sales"]}) == "queues[0]: expected a table [[queues]], got a string 'sales'"


def test_a_missing_key_is_named():
    assert one_problem({"queues": [{"id": "sales"}]}) == "queues[0].display_name: missing; this key is required"


def test_out_of_range_numbers_are_refused_when_loading():
    problems = refused(
        base_config(
            settings={"offer_timeout": 0, "stream_grace": 86401},
            limits={"max_message_chars": 0, "heartbeat_interval": float("inf")},
        )
    )
    assert problems == [
        "[settings] offer_timeout: expected more than 0, got an integer 0",
        "[settings] stream_grace: expected at most 86400, got an integer 86401",
        "[limits] max_message_chars: expected at least 1, got an integer 0",
        "[limits] heartbeat_interval: expected a finite number, got a number inf",
    ]
    doc = base_config()
    doc["agents"][0]["max_chats"] = 0
    assert one_problem(doc) == "agents[0].max_chats: expected at least 1, got an integer 0"
    # None at all is a meaningful limit for these two.
    assert (
        parse_config(base_config(limits={"max_variables": 0, "max_attachments_per_message": 0})).limits.max_variables
        == 0
    )


def test_an_account_without_a_password_is_refused():
    doc = base_config()
    del doc["agents"][3]["password"]
    doc["admins"][0]["password"] = ""
    assert refused(doc) == [
        "agents[3]: 'agent4' cannot log in; expected password or password_hash",
        "admins[0]: 'admin' cannot log in; expected password or password_hash",
    ]
    doc["admins"][0] = {"id": "admin", "password_hash": "$argon2id$v=19$m=1024,t=1,p=4$c2FsdHNhbHQ$aGFzaA"}
    del doc["agents"][3]
    assert parse_config(doc).admins[0].password is None


def test_references_to_unknown_queues_and_profiles_are_refused():
    doc = base_config()
    doc["profiles"][1]["queues"] = ["sales", "billing"]
    doc["agents"][0]["profiles"] = ["both", "nights"]
    doc["predefined_messages"][1]["queue"] = "billing"
    doc["predefined_messages"][2]["profile"] = "nights"
    assert refused(doc) == [
        "profiles[1].queues[1]: unknown queue 'billing'; expected one of the file's queues: sales, support",
        "agents[0].profiles[1]: unknown profile 'nights'; expected one of the file's profiles: both, sales, support",
        "predefined_messages[1].queue: unknown queue 'billing'; expected one of the file's queues: sales, support",
        "predefined_messages[2].profile: unknown profile 'nights'; "
        "expected one of the file's profiles: both, sales, support",
    ]


def test_a_predefined_message_for_both_a_queue_and_a_profile_is_refused():
    doc = base_config()
    doc["predefined_messages"][1]["profile"] = "sales"
    assert one_problem(doc) == (
        "predefined_messages[1]: both queue and profile; expected at most one (neither: for everyone)"
    )


@pytest.mark.parametrize("name", ["queues", "profiles", "agents", "admins", "predefined_messages"])
def test_duplicate_ids_are_refused(name):
    doc = base_config()
    doc[name].append(copy.deepcopy(doc[name][0]))
    last = len(doc[name]) - 1
    first_id = doc[name][0]["id"]
    assert one_problem(doc) == f"{name}[{last}].id: duplicate id {first_id!r} (also {name}[0]); expected each id once"


def test_all_problems_are_reported_at_once():
    doc = base_config(limits={"max_message_chars": "x"}, settings={"nope": 1})
    doc["queues"][0]["display_name"] = 5
    assert len(refused(doc)) == 3


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "qc.toml"
    path.write_text('[limits]\nmax_message_chars = "4000"\n\n[[queues]]\nid = "q"\ndisplay_name = "Q"\ncolour = 1\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert e.value.problems == (
        f"{path}: [limits] max_message_chars: expected an integer, got a string '4000'",
        f"{path}: queues[0].colour: unknown key; expected one of id, display_name, wrap_up_required",
    )


def test_load_config_refuses_a_file_that_is_not_toml(tmp_path):
    path = tmp_path / "qc.toml"
    path.write_text("[limits\n")
    with pytest.raises(ConfigError, match=f"^{path}: not valid TOML: "):
        load_config(path, environ={})


def test_environment_variables_override_the_file():
    env = {
        "QUEUECHAT_SETTINGS__STREAM_GRACE": "12",
        "QUEUECHAT_LIMITS__MAX_MESSAGE_CHARS": "2000",
        "QUEUECHAT_LIMITS__HEARTBEAT_INTERVAL": "2.5",
        "QUEUECHAT_SECURITY__IDENTITY_SECRETS": '["new-secret-0123456789", "old-secret-0123456789"]',
        # The command line's variables are not configuration keys.
        "QUEUECHAT_CONFIG": "config/demo.toml",
        "QUEUECHAT_LISTEN": "[::]:50051",
        "HOME": "/root",
    }
    doc = base_config()
    del doc["settings"]
    cfg = parse_config(doc, env)
    assert cfg.settings == Settings(stream_grace=12.0)
    # Given through the environment counts as given: it overrides what AdminService stored.
    assert cfg.settings_given == {"stream_grace"}
    assert cfg.limits.max_message_chars == 2000 and cfg.limits.heartbeat_interval == 2.5
    assert cfg.identity_secrets == ["new-secret-0123456789", "old-secret-0123456789"]
    # Lower case works too; the file's value is overridden.
    cfg = parse_config(base_config(), {"QUEUECHAT_settings__offer_timeout": "7"})
    assert cfg.settings.offer_timeout == 7.0


def test_parse_config_does_not_read_the_process_environment(monkeypatch):
    monkeypatch.setenv("QUEUECHAT_SETTINGS__OFFER_TIMEOUT", "oops")
    assert parse_config(base_config()).settings.offer_timeout == 30.0


def test_load_config_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("QUEUECHAT_LIMITS__MAX_VARIABLES", "9")
    assert load_config(ROOT / "config/demo.toml").limits.max_variables == 9


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "QUEUECHAT_SETTINGS__OFFER_TIMEOUT",
            "soon",
            "environment variable QUEUECHAT_SETTINGS__OFFER_TIMEOUT ([settings] offer_timeout): "
            "expected a number, got a string 'soon'",
        ),
        (
            "QUEUECHAT_SETTINGS__OFFER_TIMEOUT",
            "-1",
            "environment variable QUEUECHAT_SETTINGS__OFFER_TIMEOUT ([settings] offer_timeout): "
            "expected more than 0, got an integer -1",
        ),
        (
            "QUEUECHAT_LIMITS__MAX_MESSAGE_CHARS",
            "2.5",
            "environment variable QUEUECHAT_LIMITS__MAX_MESSAGE_CHARS ([limits] max_message_chars): "
            "expected an integer, got a number 2.5",
        ),
        (
            "QUEUECHAT_SECURITY__IDENTITY_SECRETS",
            "just-one-secret",
            "environment variable QUEUECHAT_SECURITY__IDENTITY_SECRETS ([security] identity_secrets): "
            "expected a list of strings, got a string",
        ),
        (
            "QUEUECHAT_LIMITS__MAX_MESAGE_CHARS",
            "10",
            "environment variable QUEUECHAT_LIMITS__MAX_MESAGE_CHARS ([limits] max_mesage_chars): "
            "unknown key; expected one of max_message_chars,",
        ),
        (
            "QUEUECHAT_AGENTS__MAX_CHATS",
            "3",
            "environment variable QUEUECHAT_AGENTS__MAX_CHATS: unknown section 'agents'; "
            "expected one of QUEUECHAT_SETTINGS__, QUEUECHAT_LIMITS__, QUEUECHAT_SECURITY__",
        ),
        (
            # A newline cannot smuggle in another key: the whole value is one (wrong) string.
            "QUEUECHAT_LIMITS__MAX_VARIABLES",
            "5\nmax_message_chars = 1",
            "environment variable QUEUECHAT_LIMITS__MAX_VARIABLES ([limits] max_variables): "
            "expected an integer, got a string '5\\nmax_message_chars = 1'",
        ),
    ],
)
def test_a_bad_environment_variable_is_refused_by_name(name, value, expected):
    assert one_problem(base_config(), {name: value}).startswith(expected)


def test_the_cluster_section_has_defaults_and_takes_the_environment():
    cfg = parse_config(base_config(), {"QUEUECHAT_CLUSTER__LEASE_SECONDS": "4"})
    assert (cfg.cluster.lease_seconds, cfg.cluster.sweep_interval, cfg.cluster.reconcile_interval) == (4.0, 1.0, 2.0)
    doc = base_config()
    doc["cluster"] = {"reconcile_interval": 0}
    assert one_problem(doc) == "[cluster] reconcile_interval: expected more than 0, got an integer 0"
