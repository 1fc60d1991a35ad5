"""What a user reads: log lines on lines of their own (not on a progress bar's), accuracies in JSON without float32
noise, refusals that name the flag to pass."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vlprompt.methods.base import classification_metrics

# the CLI, with `vlprompt datasets` replaced by a command that logs while a progress bar is drawn
_LOG_DURING_A_BAR = r"""
import logging, sys
from tqdm import tqdm
import vlprompt.cli.data as data

def cmd(args):
    bar = tqdm(total=10, desc="encoding", file=sys.stderr, mininterval=0, miniters=1, disable=False)
    bar.update(3)
    logging.getLogger("vlprompt").info("MESSAGE in the middle")
    bar.update(7)
    bar.close()
    return 0

data.cmd_datasets = cmd
from vlprompt.cli import main
sys.exit(main(["datasets"]))
"""


def test_log_lines_do_not_land_on_the_progress_bars_line():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _LOG_DURING_A_BAR], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, found, _ = proc.stderr.partition("MESSAGE in the middle")
    assert found, proc.stderr
    assert "encoding" in before  # the bar was drawn before the line
    line_start = before.rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    assert line_start == "", repr(before[-120:])  # the bar's line was cleared: the message starts a line of its own


def test_the_console_handler_writes_through_tqdm(capsys):
    import io
    import logging

    from tqdm import tqdm

    from vlprompt.cli import ConsoleHandler

    stream = io.StringIO()
    handler = ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    bar = tqdm(total=4, file=stream, mininterval=0, miniters=1, disable=False)
    bar.update(1)
    handler.emit(logging.LogRecord("vlprompt", logging.INFO, __file__, 1, "hello", None, None))
    bar.close()
    text = stream.getvalue()
    assert text.split("hello")[0].rsplit("\r", 1)[-1] == "" and "hello\n" in text


@pytest.mark.parametrize("correct, n", [(1, 10), (29, 100), (7, 10), (1, 3)])
def test_accuracies_are_exact_fractions_of_the_counts(correct, n):
    labels = torch.zeros(n, dtype=torch.long)
    logits = torch.zeros(n, 2)
    logits[correct:, 1] = 1.0  # the first `correct` predict class 0
    m = classification_metrics(logits, labels, 2)
    assert m["accuracy"] == 100 * correct / n  # correctly rounded: 10.0, 29.0, 70.0, 33.333333333333336
    assert json.dumps(m["accuracy"]) == json.dumps(100 * correct / n)
    assert m["mean_per_class_accuracy"] == 100 * correct / n  # one class present


def test_mean_per_class_accuracy_is_exact():
    # class 0: 1 of 3 right, class 1: 2 of 3 right -> (1/3 + 2/3) / 2 = 1/2 -> 50.0 exactly
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    pred = torch.tensor([0, 1, 1, 1, 1, 0])
    m = classification_metrics(torch.nn.functional.one_hot(pred, 2).float(), labels, 2)
    assert m["accuracy"] == 50.0 and m["mean_per_class_accuracy"] == 50.0


def test_ordinal_accuracies_are_exact_fractions_of_the_counts():
    from vlprompt.methods.ordinal.parts import ordinal_metrics

    targets = torch.arange(100, dtype=torch.float32)
    pred = targets.clone()
    pred[29:] += 5  # 29 of 100 right
    m = ordinal_metrics(pred, pred, targets)
    assert m["acc_argmax"] == 29.0 and m["acc_expectation"] == 29.0  # not 28.999999999999996
    m = ordinal_metrics(pred[:3], pred[:3], targets[:3] + torch.tensor([0.0, 0.0, 1.0]))
    assert m["acc_argmax"] == 100 * 2 / 3


def test_too_few_images_names_the_flag(tmp_path):
    from conftest import color_folder
    from vlprompt.data import few_shot_split, load_dataset
    from vlprompt.errors import DataError

    ds = load_dataset("folder", str(color_folder(tmp_path / "shapes")))
    with pytest.raises(DataError) as e:
        few_shot_split(ds, 16, 1)
    assert "--allow-fewer" in str(e.value) and "allow_fewer=True" not in str(e.value)
