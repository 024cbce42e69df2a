"""memlens.progress: a loop's progress drawn, forwarded as events, and shown again by a study."""

import io
import logging

import pytest
from rich.console import Console

import memlens.progress as P
from memlens.progress import LoopLines, forward_to, progress_bar, study_progress


@pytest.fixture
def forwarded(monkeypatch):
    events = []
    forward_to(events.append)
    yield events
    forward_to(None)


def test_a_forwarded_loop_says_where_it_starts_how_far_it_got_and_when_it_ends(forwarded, monkeypatch):
    clock = iter([100.0, 100.2, 101.5, 101.6, 103.0, 104.0])
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    with progress_bar("train", 10, unit="steps", completed=4, fields={"loss": "-"}) as advance:
        advance(1, loss="3.0")  # 0.2 s after the start: not sent
        advance(1, loss="2.9")  # 1.5 s: sent
        advance(2)  # 1.6 s: 0.1 s after the last send
    assert forwarded == [("start", "train", 10, 4, "steps"), ("update", 6, {"loss": "2.9"}),
                         ("update", 8, {"loss": "2.9"}), ("end", "train", 8, 10, "steps", 3.0)]


def test_a_loop_that_fails_still_ends_and_a_disabled_one_says_nothing(forwarded):
    with pytest.raises(RuntimeError), progress_bar("score", 5) as advance:
        advance(2)
        raise RuntimeError("stop")
    assert forwarded[0] == ("start", "score", 5, 0, "seq") and forwarded[-1][:5] == ("end", "score", 2, 5, "seq")

    def broken(event):
        raise OSError("the queue is closed")

    forward_to(broken)  # a sink that fails neither stops the loop nor hides its own error
    with pytest.raises(RuntimeError, match="its own"), progress_bar("score", 5) as advance:
        advance(5)
        raise RuntimeError("its own")
    forward_to(forwarded.append)
    forwarded.clear()
    with progress_bar("score", 5, enabled=False) as advance:
        advance(5, loss="1")
    assert forwarded == []


def test_a_drawn_bar_takes_its_fields_and_a_head_start(capsys):
    with progress_bar("train", 10, unit="steps", completed=3, fields={"loss": "-", "tok/s": "-"}) as advance:
        advance(1, **{"loss": "2.5", "tok/s": "120"})
    out = capsys.readouterr().out
    assert "4/10" in out and "loss 2.5" in out and "tok/s 120" in out, out


def test_loop_lines_nest_update_the_innermost_and_log_the_long_ones(caplog, monkeypatch):
    monkeypatch.setattr(P, "LOGGED_S", 60.0)
    out = io.StringIO()
    bar = study_progress(console=Console(file=out, force_terminal=True, width=160))
    bar.start()
    bar.add_task("study t", total=3, current="lora.targets=[q]")
    lines = LoopLines(bar, "run lora.rank=1")
    with caplog.at_level(logging.INFO, logger="memlens.progress"):
        lines(("start", "references", 4, 0, "adapters"))
        lines(("start", "train", 138, 20, "steps"))
        shown = {t.description: t for t in bar.tasks}
        assert set(shown) == {"study t", "  references", "    train"} and shown["    train"].completed == 20
        lines(("update", 57, {"loss": "3.1042", "tok/s": "120"}))
        train = next(t for t in bar.tasks if t.description == "    train")
        assert train.completed == 57 and train.fields["current"] == "steps loss 3.1042 tok/s 120"
        assert next(t for t in bar.tasks if t.description == "  references").completed == 0
        lines(("end", "train", 138, 138, "steps", 1850.4))
        lines(("start", "score [/x] reference 1", 100, 0, "seq"))  # a description is text, not markup
        lines(("update", 40, {"x": "[bold]"}))
        bar.refresh()
        lines(("end", "score [/x] reference 1", 100, 100, "seq", 12.0))  # short: no line
        assert [t.description for t in bar.tasks] == ["study t", "  references"]
        lines(("start", "train", 138, 0, "steps"))
        lines(("end", "train", 138, 138, "steps", 61.0))
        lines(("start", "train", 138, 70, "steps"))  # went on from a saved state
        lines(("end", "train", 138, 138, "steps", 900.0))
        lines.close()
    bar.stop()
    assert [t.description for t in bar.tasks] == ["study t"]
    assert "score [/x] reference 1" in out.getvalue() and "x [bold]" in out.getvalue()
    assert caplog.messages == ["run lora.rank=1: train 138 of 138 steps (from 20) in 1850 s",
                               "run lora.rank=1: train 138 of 138 steps in 61 s",
                               "run lora.rank=1: train 138 of 138 steps (from 70) in 900 s"]
