"""What the job prints: a live line on a terminal, plain lines in logs, JSON for collectors."""

import io
import json

from job.report import Console

STATS = {"epoch": 1, "epochs": 3, "step_in_epoch": 5, "steps_per_epoch": 10, "step": 5, "loss": 1.5,
         "accuracy": 0.25, "images_per_second": 1234.0}
EPOCH = {"epoch": 1, "step": 10, "loss": 1.0, "accuracy": 0.5, "val_loss": None, "val_accuracy": None,
         "seconds": 1.0, "images_per_second": 640.0, "learning_rate": 0.001}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_one_live_line_that_ends_before_other_output():
    out = Terminal()
    console = Console("text", stream=out)
    console.progress(**STATS)
    console.progress(**{**STATS, "step_in_epoch": 6, "step": 6})
    console.info("done")
    text = out.getvalue()
    assert text.count("\r") == 2 and "[##############..........] 6/10" in text
    assert text.endswith("\ndone\n")


def test_logs_get_plain_lines():
    out = io.StringIO()
    console = Console("text", stream=out)
    console.progress(**STATS)
    console.epoch_end(EPOCH)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2
    assert "loss 1.5000" in lines[0] and "1,234 img/s" in lines[0] and "val_loss" not in lines[1]


def test_json_format_is_one_object_per_line():
    out = io.StringIO()
    console = Console("json", stream=out)
    console.info("resolved config", config={"seed": 0})
    console.progress(**STATS)
    console.epoch_end(EPOCH)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["info", "progress", "epoch"]
    assert events[0]["config"] == {"seed": 0} and events[1]["images_per_second"] == 1234.0
