"""Server-side SVG charts: what they draw, and that labels cannot inject markup."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from lorafleet.server.console.charts import bar_chart, format_bytes, line_chart, nice_ticks

NS = "{http://www.w3.org/2000/svg}"


def test_a_line_chart_draws_one_line_and_a_dot_per_point_per_series() -> None:
    # Execute
    svg = line_chart(
        {"base": [(1, 3.4), (2, 3.4)], "personal": [(1, 2.9), (2, 2.5)]},
        title="loss",
        x_label="round",
        y_label="loss",
    )

    # Assert
    root = ET.fromstring(str(svg))
    assert len(root.findall(f"{NS}polyline")) == 2
    assert len(root.findall(f"{NS}circle")) == 4
    titles = [c.find(f"{NS}title").text for c in root.findall(f"{NS}circle")]  # type: ignore[union-attr]
    assert "personal, round 2: 2.5" in titles


def test_non_finite_points_are_skipped_not_drawn() -> None:
    svg = line_chart(
        {"a": [(1, math.nan), (2, 1.0), (3, math.inf)]}, title="t", x_label="x", y_label="y"
    )
    assert str(svg).count("<circle") == 1


def test_labels_are_escaped() -> None:
    # Execute
    svg = str(bar_chart([(1, {"<script>": 5.0})], title="a & <b>", x_label="x", y_label="y"))

    # Assert
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    ET.fromstring(svg)  # still well-formed XML


@pytest.mark.parametrize("chart", ["line", "bar"])
def test_no_data_yet_is_said_not_drawn_as_an_empty_axis(chart: str) -> None:
    svg = (
        line_chart({}, title="t", x_label="x", y_label="y")
        if chart == "line"
        else bar_chart([], title="t", x_label="x", y_label="y")
    )
    assert "no data yet" in svg


@pytest.mark.parametrize(
    ("low", "high", "ticks"),
    [
        (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (2.3, 3.4, [2.0, 2.5, 3.0, 3.5]),
        (5.0, 5.0, [5.0, 5.2, 5.4, 5.6, 5.8, 6.0]),
    ],
)
def test_ticks_are_round_numbers_covering_the_range(
    low: float, high: float, ticks: list[float]
) -> None:
    assert nice_ticks(low, high) == ticks


@pytest.mark.parametrize(
    ("value", "text"), [(512, "512 B"), (1536, "1.5 KiB"), (3 * 2**20, "3 MiB")]
)
def test_bytes_read_in_binary_units(value: int, text: str) -> None:
    assert format_bytes(value) == text
