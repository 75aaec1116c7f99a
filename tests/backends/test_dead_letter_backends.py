"""Dead-letter backends' own behaviour beyond the contract: the file writes only on flush; `none` logs and drops."""

import logging

from contract.test_dead_letters import COORDS, read_file

from consumers.dead_letters import open_dead_letters


def test_nothing_is_written_before_flush_for_the_file(tmp_path):
    path = tmp_path / "x.dlq.jsonl"
    dead_letters = open_dead_letters(path.as_uri(), (tmp_path / "events.avro").as_uri(), "grp", {})
    dead_letters.send(b"v", None, [], "bad_object", "e", COORDS)
    assert not path.exists()
    dead_letters.flush()
    assert len(read_file(path, 1)) == 1


def test_none_logs_and_drops(tmp_path):
    class Lines(logging.Handler):
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler = Lines()
    logger = logging.getLogger("vllm_mm_events.consumer")  # ours may not propagate to pytest's capture
    logger.addHandler(handler)
    try:
        with open_dead_letters("none", (tmp_path / "events.avro").as_uri(), "grp", {}) as dead_letters:
            dead_letters.send(b"v", None, [], "bad_object", "broken", COORDS)
            dead_letters.flush()
    finally:
        logger.removeHandler(handler)
    assert len(handler.lines) == 1 and "bad_object" in handler.lines[0] and "broken" in handler.lines[0]
