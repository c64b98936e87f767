import pytest

from scrollzarr.errors import UsageError
from scrollzarr.ranges import AxisRange, parse_ranges


def bounds(text):
    """parse_ranges in x, y, z order as (start, stop) pairs, for readability."""
    z, y, x = parse_ranges(text)
    return [(r.start, r.stop) for r in (x, y, z)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000:2000,1500:4000,2000:7000", [(1000, 2000), (1500, 4000), (2000, 7000)]),
        (":5", [(None, 5), (None, None), (None, None)]),
        ("5:", [(5, None), (None, None), (None, None)]),
        (":", [(None, None)] * 3),
        (":,:,:1000", [(None, None), (None, None), (None, 1000)]),
        ("100:600,,", [(100, 600), (None, None), (None, None)]),
        (",,10:20", [(None, None), (None, None), (10, 20)]),
        (",7:9", [(None, None), (7, 9), (None, None)]),
        (" 1 : 4 , 2:3 ", [(1, 4), (2, 3), (None, None)]),
        ("0:10:1,,", [(0, 10), (None, None), (None, None)]),
        ("-10:,,", [(-10, None), (None, None), (None, None)]),
        (None, [(None, None)] * 3),
        ("", [(None, None)] * 3),
    ],
)
def test_examples_parse_in_xyz(text, expected):
    assert bounds(text) == expected


def test_result_is_in_zyx_order():
    z, y, x = parse_ranges("1:2,3:4,5:6")
    assert (z.axis, y.axis, x.axis) == ("z", "y", "x")
    assert (z.start, y.start, x.start) == (5, 3, 1)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0:10:2", "only start:stop (step 1)"),
        ("5", "single index"),
        ("a:b", "not of the form start:stop"),
        ("1.5:3", "not of the form start:stop"),
        ("1:2,3:4,5:6,7:8", "at most three"),
        ("1:2:3:4", "too many ':'"),
    ],
)
def test_malformed_ranges_are_clear_errors(text, fragment):
    with pytest.raises(UsageError, match="--ranges") as error:
        parse_ranges(text)
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("start", "stop", "length", "expected"),
    [
        (None, None, 10, (0, 10)),
        (2, 5, 10, (2, 5)),
        (2, 500, 10, (2, 10)),  # an out-of-bounds stop is clipped
        (-3, None, 10, (7, 10)),
        (None, -2, 10, (0, 8)),
        (-50, 4, 10, (0, 4)),
    ],
)
def test_resolve_clips_like_python(start, stop, length, expected):
    assert AxisRange("x", start, stop).resolve(length) == expected


def test_start_past_the_data_is_an_error():
    with pytest.raises(UsageError, match="x starts at 10, past the data"):
        AxisRange("x", 10, 20).resolve(10)


def test_empty_range_is_an_error():
    with pytest.raises(UsageError, match="selects nothing"):
        AxisRange("z", 5, 5).resolve(10)
