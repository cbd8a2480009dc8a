"""The benchmarks' helper module (benchmarks/benchlib.py): the scripts rewrite one section of
BENCHMARKS.md and keep every other one."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from benchlib import join_section, replace_section, split_section  # noqa: E402

TEXT = "# Benchmarks\n\n## A\n\nalpha\n\n## B\n\nbeta\n### sub\nmore\n\n## C\n\ngamma\n"


def test_split_and_join_round_trip():
    for heading in ("## A", "## B", "## C"):
        before, section, after = split_section(TEXT, heading)
        assert section.startswith(heading) and "\n## " not in section
        assert join_section(before, section, after) == TEXT
    assert split_section(TEXT, "## B")[1] == "## B\n\nbeta\n### sub\nmore\n\n"


def test_replace_keeps_other_sections_and_appends_new_ones(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(TEXT)
    replace_section(path, "## B", "## B\n\nnew beta\n")
    assert path.read_text() == TEXT.replace("beta\n### sub\nmore\n", "new beta\n")
    replace_section(path, "## D", "## D\n\ndelta\n")
    assert path.read_text().endswith("## C\n\ngamma\n\n## D\n\ndelta\n")
    replace_section(tmp_path / "new.md", "## A", "## A\n\nx\n")
    assert (tmp_path / "new.md").read_text() == "# Benchmarks\n\n## A\n\nx\n"


def test_ece_floor_is_the_expected_ece_of_a_calibrated_predictor():
    """benchmarks/ece_floor.py: with every confidence 0.7 (one bin), the ECE against labels drawn
    from the predictions is |Binomial(n, 0.7)/n − 0.7|; its exact mean is the floor."""
    import math

    import torch
    from ece_floor import floor

    n, p = 50, 0.7
    probs = torch.tensor([[p, 1 - p]], dtype=torch.float64).expand(n, 2)
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    dev = [abs(k / n - p) for k in range(n + 1)]
    mean = sum(w * d for w, d in zip(pmf, dev))
    sd = math.sqrt(sum(w * d * d for w, d in zip(pmf, dev)) - mean**2)
    draws = 2000
    got, q95 = floor(probs, draws, torch.Generator().manual_seed(0))
    assert abs(got - mean) < 5 * sd / math.sqrt(draws), (got, mean)
    assert q95 > got
    # a predictor that is always right with confidence 1 has no floor
    sure = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(n, 2)
    assert floor(sure, 10, torch.Generator().manual_seed(0)) == (0.0, 0.0)
