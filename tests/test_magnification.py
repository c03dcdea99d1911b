import pytest

from sharding.layout import UnsafeNameError, sample_key, slide_id
from sharding.magnification import Magnification, parse_mags, tile_sizes
from sharding.options import parse_size


@pytest.mark.parametrize(
    ("text", "power", "name"),
    [
        ("10x", 10, "10x"),
        ("5", 5, "5x"),
        ("2.5x", 2.5, "2p5x"),
        ("1.25", 1.25, "1p25x"),
        ("0.625x", 0.625, "0p625x"),
        ("0.5um", 20, "20x"),
        ("0.25mpp", 40, "40x"),
        ("2p5x", 2.5, "2p5x"),
    ],
)
def test_parse_and_name(text, power, name):
    mag = Magnification.parse(text)
    assert mag.power == pytest.approx(power)
    assert mag.name == name
    assert "." not in mag.name
    assert Magnification.parse(mag.name) == mag


def test_mpp_contract():
    assert Magnification(10).mpp == pytest.approx(1.0)
    assert Magnification(20).mpp == pytest.approx(0.5)
    assert Magnification(40).mpp == pytest.approx(0.25)
    assert Magnification.from_mpp(0.25) == Magnification(40)


@pytest.mark.parametrize("bad", ["", "x", "-5x", "0", "ten", "5yy"])
def test_bad_magnification(bad):
    with pytest.raises(ValueError):
        parse_mags(bad) if bad == "" else Magnification.parse(bad)


def test_parse_mags_order_and_sizes():
    mags = parse_mags("10,5,2.5,1.25")
    assert tile_sizes(mags, 224) == {"10x": 224, "5x": 112, "2p5x": 56, "1p25x": 28}
    with pytest.raises(ValueError, match="highest first"):
        parse_mags("5,10")
    with pytest.raises(ValueError, match="duplicate"):
        parse_mags("10,10x")
    with pytest.raises(ValueError, match="divides evenly"):
        tile_sizes(parse_mags("10,3"), 224)


def test_sizes():
    assert parse_size("256MB") == 256_000_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size(1000) == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_slide_ids():
    assert slide_id("TCGA-A1.6A2F") == "TCGA-A1-6A2F"
    assert slide_id("CMU-1_small") == "CMU-1_small"
    assert sample_key("s1", 448, 896) == "s1_448_896"
    for bad in ["../evil", "a/b", ".hidden", "", "a\\b", "x\x00y", " lead"]:
        with pytest.raises(UnsafeNameError):
            slide_id(bad)
