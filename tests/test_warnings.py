"""cbo's warnings: one per category and call, naming the batch items; logged per item; tqdm-safe.

The degenerate points are built so that the reference is known without cbo:
min ||y - q||^2 s.t. y <= h with h = q puts y* = q on the bound with a zero
multiplier (weakly active) in every entry, and h = q + 1 leaves every bound
inactive.
"""
import logging
import subprocess
import sys
import textwrap
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
from cbo.errors import collected_message, one_warning_per_category, warn
from cbo.inputs import item_names

N = 3
BATCH = 64


def _layer() -> cbo.ArgminLayer:
    q, h, y = cp.Parameter(N), cp.Parameter(N), cp.Variable(N)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(y - q)), [y <= h])
    return cbo.ArgminLayer(problem, parameters=[q, h], variables=[y])


def _batch(weak_items) -> tuple[torch.Tensor, torch.Tensor]:
    """q random; h = q (weakly active) for ``weak_items``, h = q + 1 (inactive) elsewhere."""
    q = torch.randn(BATCH, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    offset = torch.ones(BATCH, 1, dtype=torch.float64)
    offset[list(weak_items)] = 0.0
    return q, q + offset


def _degenerate(caught) -> list:
    return [w for w in caught if issubclass(w.category, cbo.DegenerateKKTWarning)]


def test_layer_batch_gives_one_warning_that_names_its_items():
    layer = _layer()
    weak = range(0, BATCH, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (y,) = layer(*_batch(weak))
    degenerate = _degenerate(caught)
    assert len(degenerate) == 1, [str(w.message)[:120] for w in degenerate]
    message = str(degenerate[0].message)
    listed = message.split("): ", 1)[0]
    assert listed == f"{len(weak)} batch item(s) (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, ..., 62"
    assert "weakly active" in message
    q, _ = _batch(weak)
    torch.testing.assert_close(y, q, atol=1e-8, rtol=0)  # y* = q: the bound is touched, not crossed


def test_every_item_of_a_degenerate_batch_is_named():
    with pytest.warns(cbo.DegenerateKKTWarning, match=rf"^{BATCH} batch item\(s\) \(0, 1, 2, .*, {BATCH - 1}\)"):
        _layer()(*_batch(range(BATCH)))


def test_every_items_warning_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="cbo.warnings"), warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        _layer()(*_batch(range(5)))
    items = {record.getMessage().split(": ", 2)[1] for record in caplog.records if "weakly active" in record.getMessage()}
    assert items >= {f"batch item {b}" for b in range(5)}
    assert all(record.name == "cbo.warnings" and record.levelno == logging.INFO for record in caplog.records)


def test_warning_filters_still_apply():
    layer, inputs = _layer(), _batch(range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cbo.DegenerateKKTWarning)
        with pytest.raises(cbo.DegenerateKKTWarning, match="^3 batch item"):
            layer(*inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        layer(*inputs)
    assert not _degenerate(caught)


def test_hypergrad_gives_one_warning_per_category():
    """An LP (hypergradient zero almost everywhere) at a weakly active point: two degeneracies, one warning."""
    x, y = cp.Parameter(2), cp.Variable(2)
    lp = cp.Problem(cp.Minimize(cp.sum(y)), [y >= x, y <= 1])
    problem = cbo.BilevelProblem(lp, [x], [y], outer=lambda x, y: (y ** 2).sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cbo.hypergrad(problem, torch.tensor([0.0, 1.0], dtype=torch.float64))
    degenerate = _degenerate(caught)
    assert len(degenerate) == 1
    assert "linear program" in str(degenerate[0].message) and "weakly active" in str(degenerate[0].message)


def test_no_cbo_logging_output_by_default():
    handlers = logging.getLogger("cbo").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_collector_nests_and_issues_on_error():
    """An inner collecting call hands its warnings to the outer one; a failing call still issues them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError), one_warning_per_category():
            warn("batch item 0: first", cbo.InaccurateSolutionWarning)
            with one_warning_per_category():
                warn("batch item 1: first", cbo.InaccurateSolutionWarning)
            raise RuntimeError
    assert [str(w.message) for w in caught] == ["2 batch item(s) (0, 1): first"]


def test_collected_message_reads_the_item_prefix_of_inputs():
    """The collector parses the prefix that cbo.inputs.item_names writes, for flat and nested batches."""
    flat, nested = item_names((4,)), item_names((2, 3))
    message = collected_message([flat(0) + "a", flat(3) + "a", flat(3) + "b"])
    assert message == "2 batch item(s) (0, 3): a [batch item(s) 0, 3] | b [batch item(s) 3]"
    assert collected_message([nested(0) + "a", nested(5) + "a"]) == "2 batch item(s) ((0, 0), (1, 2)): a"


PROGRESS_SCRIPT = textwrap.dedent("""
    import logging, sys
    import cvxpy as cp, torch, cbo
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)   # an application that logs to the console
    x, y = cp.Parameter(2), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y <= 0])
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: ((y - 1) ** 2).sum())
    cbo.minimize(problem, torch.zeros(2, dtype=torch.float64), optimizer="sgd", lr=0.1, steps=5, progress=True)
""")


def _rendered(output: str) -> list[str]:
    """The lines a terminal shows for ``output``: each carriage return moves back to column 0 and overwrites."""
    lines = []
    for raw in output.split("\n"):
        screen: list[str] = []
        for segment in raw.split("\r"):
            screen[: len(segment)] = segment
        lines.append("".join(screen).rstrip())
    return lines


def test_progress_bar_stays_on_its_own_line():
    """The DegenerateKKTWarning of minimize's first step (x = 0: y* = 0 on its bound, zero multiplier),
    and its log record, are printed on lines of their own, not appended to the tqdm bar."""
    result = subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = _rendered(result.stderr)
    warned = [line for line in lines if "DegenerateKKTWarning:" in line and not line.startswith("INFO:")]
    logged = [line for line in lines if "INFO:cbo.warnings:DegenerateKKTWarning" in line]
    assert len(warned) == 1 and logged, result.stderr
    assert not any("cbo.minimize" in line for line in warned + logged), repr(result.stderr)
    assert any(line.startswith("cbo.minimize: ") for line in lines), repr(result.stderr)
