import json
import re

import pytest

from consumers.config import ConfigError, ConsumerConfig, default_group


def load(flags=None, env=None, config_file=None, required=("source", "sinks")):
    return ConsumerConfig.load(flags or {}, environ=env or {}, config_file=config_file, required=required)


def test_flags_beat_env_beat_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pooling: max\nbatch_max_records: 7\ngroup: from-file\nsinks: [lancedb:///d/t]\n")
    env = {"VLLM_MM_EVENTS_CONSUMER_CONFIG_FILE": str(f), "VLLM_MM_EVENTS_SOURCE": "kafka://k:9092/topic",
           "VLLM_MM_EVENTS_GROUP": "from-env", "VLLM_MM_EVENTS_NORMALIZE": "true",
           "VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD": "pw-secret",
           "VLLM_MM_EVENTS_KAFKA": '{"security.protocol": "SASL_SSL"}'}
    c = load({"pooling": "first"}, env)
    assert c.pooling == "first" and c.batch_max_records == 7 and c.group == "from-env" and c.normalize is True
    assert c.sinks == ("lancedb:///d/t",) and c.source == "kafka://k:9092/topic"
    assert c.kafka == {"security.protocol": "SASL_SSL", "sasl.password": "pw-secret"}
    assert "pw-secret" not in repr(c) and "pw-secret" not in json.dumps(c.redacted())


def test_defaults():
    c = load({"source": "file:///var/log/events.avro", "sinks": ["qdrant://q:6333/images"]})
    assert (c.pooling, c.normalize, c.distance) == ("mean", False, "cosine")
    assert c.group == default_group(["qdrant://q:6333/images"])
    assert c.dlq is None and c.metrics_port == 9400 and c.batch_max_records == 256


def test_no_flags_means_the_embedded_defaults(tmp_path, monkeypatch):
    """source, sinks and object_store all under the publisher's data directory ($XDG_DATA_HOME honoured)."""
    from publisher.config import PublisherConfig

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "x y"))  # a space: the URIs are quoted
    c = load(required=())
    data = tmp_path / "x y" / "vllm-mm-events"
    pub = PublisherConfig.load(environ={})
    assert c.source == pub.event_sink == (data / "events.avro").as_uri()
    assert c.object_store == (pub.object_store,) == ((data / "objects").as_uri(),)
    assert c.sinks == ("lancedb://" + str(data / "lancedb" / "mm_embeddings").replace(" ", "%20"),)
    from consumers.sinks.base import split_collection

    assert split_collection(c.sinks[0]) == (str(data / "lancedb"), "mm_embeddings")
    assert c.group == default_group(c.sinks) == "vllm-mm-events-lancedb-mm_embeddings-" + c.group[-10:]


def test_a_named_group_wins_over_the_derived_one():
    assert load({"sinks": ["qdrant://q:6333/c"], "group": "mine"}, required=()).group == "mine"
    assert load(env={"VLLM_MM_EVENTS_GROUP": "from-env"}, required=()).group == "from-env"


def test_the_derived_group_is_stable_per_set_of_sinks_and_holds_no_secret():
    a, b = "lancedb:///data/lance/images", "qdrant://qdrant:6333/images"
    g = default_group([a, b])
    assert g == default_group([b, a]) == default_group([a, b, a])  # order and repeats do not matter
    assert g == "vllm-mm-events-lancedb-images-qdrant-images-" + g.rsplit("-", 1)[1]
    assert re.fullmatch(r"vllm-mm-events-[A-Za-z0-9_-]+-[0-9a-f]{10}", g)
    others = {default_group([a]), default_group([b]), default_group(["lancedb:///data/lance2/images"]),
              default_group(["qdrant://other:6333/images"]), default_group(["qdrant:///dir/images"])}
    assert len(others | {g}) == 6  # another store, or the same name elsewhere: another group
    # The same table reached with other credentials is the same destination: the same group, and
    # neither the user nor the password appears in it (they are not even hashed).
    pg = default_group(["pgvector://alice:hunter2@db:5432/vectors/images"])
    assert pg == default_group(["pgvector://bob:s3cret@db:5432/vectors/images"]) == \
        default_group(["pgvector://db:5432/vectors/images"])
    assert not {"alice", "hunter2", "db", "5432", "vectors"} & set(re.split(r"[-_]", pg))
    assert pg.startswith("vllm-mm-events-pgvector-images-")
    # Safe as a file name (it names the file source's checkpoint) and as a Kafka group id.
    long = default_group([f"qdrant://q:6333/{'x' * 60}", f"milvus://m:19530/{'y' * 60}"])
    assert len(long) <= 15 + 80 + 11 and re.fullmatch(r"[A-Za-z0-9_.-]+", long)


def test_sinks_from_env_are_comma_separated():
    c = load(env={"VLLM_MM_EVENTS_SOURCE": "kafka://a:1,b:2/t",
                  "VLLM_MM_EVENTS_SINKS": "qdrant://q:6333/c, pgvector://u@pg:5432/db/tbl"})
    assert c.sinks == ("qdrant://q:6333/c", "pgvector://u@pg:5432/db/tbl")


@pytest.mark.parametrize("flags,needle", [
    ({"sinks": ["x"]}, "source: required; pass --source or set VLLM_MM_EVENTS_SOURCE"),
    ({"source": "kafka://k:9092/t"}, "sinks: required; pass --sink or set VLLM_MM_EVENTS_SINKS"),
    ({"source": "kafka://k:9092/t", "sinks": ["chroma://h:1/c"]},
     "sinks[0]: unknown sink 'chroma://'; expected one of qdrant://, pgvector://, milvus://, lancedb://"),
    ({"source": "kafka://k:9092/t", "sinks": ["pgvector://u:hunter2@h:5432/db/t"]},
     "sinks[0]: put no password in the sink URI"),
    ({"source": "kafka://k:9092/t", "sinks": ["pgvector://u@h:5432/db"]},
     "sinks[0]: expected pgvector://user@host:port/database/table"),
    ({"source": "kafka://k:9092/t", "sinks": ["lancedb://relative/t"]}, "sinks[0]: expected lancedb:///absolute/dir/table"),
    ({"source": "kafka://k:9092/t", "sinks": ["qdrant://q:6333/bad-name"]}, "collection/table name 'bad-name'"),
    ({"source": "http://k:9092/t", "sinks": ["qdrant://q:6333/c"]}, "source: expected kafka://host:port/topic"),
    ({"source": "kafka://k/t", "sinks": ["qdrant://q:6333/c"]}, "source: expected host:port in the broker list"),
    ({"source": "kafka://k:9092/t", "sinks": ["qdrant://q:6333/c"], "pooling": "avg"},
     "pooling: expected one of mean, first, max, none; got 'avg'"),
    ({"source": "kafka://k:9092/t", "sinks": ["qdrant://q:6333/c"], "batch_max_records": "many"},
     "batch_max_records: expected a int >= 1"),
    # a poll past /healthz's 120 s turned an idle consumer unhealthy, and held a SIGTERM
    ({"source": "kafka://k:9092/t", "sinks": ["qdrant://q:6333/c"], "poll_timeout_s": 1e300},
     "poll_timeout_s: expected a float from 0.01 to 30.0"),
    # a password holding '/' ends the authority early: its head was echoed as a bad port
    ({"source": "kafka://k:9092/t", "sinks": ["pgvector://alice:hunter2/w0rd@pg:5432/db/tab"]},
     "sinks[0]: the port in 'pgvector://***@pg:5432/db/tab' is not a number"),
    ({"source": "kafka://k:9092/t", "sinks": ["qdrant://k:hunter2/x@q:6333/c"]}, "sinks[0]: the port in"),
    ({"source": "kafka://k:9092/t", "sinks": ["qdrant://q:6333/c"], "metrics_port": 70000},
     "metrics_port: expected a TCP port 0-65535"),
])
def test_errors_name_the_field_and_the_expectation(flags, needle):
    with pytest.raises(ConfigError) as e:
        load(flags)
    assert needle in str(e.value)
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("key,needle", [
    ("batch_max_records", "batch_max_records: expected a int >= 1, got null"),
    ("max_object_bytes", "max_object_bytes: expected a int >= 1, got null"),
    ("poll_timeout_s", "poll_timeout_s: expected a float from 0.01 to 30.0, got null"),
])
def test_null_in_a_file_is_checked_like_any_value(tmp_path, key, needle):
    """It passed unchecked: the consumer started, then crashed in its loop with a TypeError."""
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"source": "kafka://k:9092/t", "sinks": ["qdrant://q:6333/c"], key: None}))
    with pytest.raises(ConfigError) as e:
        load(config_file=str(f))
    assert needle in str(e.value)


def test_unknown_file_key_is_named(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"source": "kafka://k:9092/t", "sinks": ["qdrant://q:6333/c"], "polling": "mean"}))
    with pytest.raises(ConfigError, match="polling: unknown key"):
        load(config_file=str(f))


def test_cli_exits_2_with_the_message(capsys):
    from consumers.cli import main

    assert main(["consume", "--source", "kafka://k:9092/t", "--sink", "faiss:///x/y"]) == 2
    assert "unknown sink 'faiss://'" in capsys.readouterr().err


@pytest.mark.parametrize("value", [True, "true", 1])
def test_kafka_auto_commit_is_refused_naming_the_setting(value):
    """The source commits after the sinks have written: librdkafka's timer would commit events never indexed."""
    from consumers.sources.kafka import KafkaSource

    with pytest.raises(ValueError, match="kafka.enable.auto.commit: the consumer commits after its sinks"):
        KafkaSource("kafka://127.0.0.1:9/t", "g", {"enable.auto.commit": value})


@pytest.mark.parametrize("text,needle", [
    ("1: x\n", "1: keys are names, not ints"),  # an AttributeError before
    ("object_store__settings: [1]\n", "object_store: expected a mapping of settings"),  # a TypeError before
])
def test_a_malformed_file_is_a_config_error_naming_what(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load(config_file=str(f))


def test_a_group_that_cannot_name_the_file_sources_checkpoint_is_refused(tmp_path):
    """``--group a/b`` with a file source raised a ValueError from pathlib when the source opened."""
    flags = {"source": (tmp_path / "events.avro").as_uri(), "sinks": ["qdrant://q:6333/c"], "group": "a/b"}
    with pytest.raises(ConfigError, match="group: 'a/b' names the file source's checkpoint"):
        load(flags)
    assert load(dict(flags, checkpoint=str(tmp_path / "pos.json"))).group == "a/b"  # its own checkpoint: fine
    assert load(dict(flags, source="kafka://k:9092/t")).group == "a/b"  # a Kafka group id may hold '/'
