"""A slide whose reads kill their worker process fails alone, in bounded time; the run goes on.

Ray Data retries a task whose worker died forever by default, so one slide that crashes
OpenSlide (or gets its reader OOM-killed) used to hang ``predict``. Here ``x.svs`` plans fine, but
every read of its regions ends the worker process at once (``os._exit``, through the test-only
hook :data:`resdistill.predict.stages.TEST_CRASH_ENV`, which reaches the session cluster's
workers through this driver's ``runtime_env``): after
:data:`resdistill.predict.engine.READ_RETRIES` retries its status row in ``slides.parquet`` says
why, the other slides are predicted, the summary counts one failed slide and the exit code is 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from resdistill.predict.engine import READ_RETRIES
from resdistill.predict.stages import TEST_CRASH_ENV
from tests.slide_factory import blob_image, write_slide
from tests.test_evaluate import save_checkpoint
from tests.test_predict_scale import chain, model, predict, table

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def test_a_slide_that_kills_its_reader_fails_alone(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from sharding.ray_cluster import forwarded_env

    ckpt = save_checkpoint(
        tmp_path / "student", model(0, 0.2), stage="student", mag="1p25x", tile_px=16,
        read_chain=chain(),
    )  # fmt: skip
    slides = tmp_path / "slides"
    slides.mkdir()
    for i, name in enumerate(("a", "b", "x")):
        write_slide(slides / f"{name}.svs", blob_image(1024, 768, seed=i), app_mag=5, mpp=2.0)
    if ray.is_initialized():
        ray.shutdown()
    env = {**forwarded_env(), TEST_CRASH_ENV: "x.svs"}
    ray.init(address=ray_cluster, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
    try:
        rc = predict(ray_cluster, ckpt, [str(slides)], str(tmp_path / "out"))
    finally:
        ray.shutdown()
    captured = capsys.readouterr()
    assert rc == 1
    rows = table(str(tmp_path / "out"), "slides.parquet").set_index("slide")
    assert sorted(rows.index) == ["a", "b", "x"]
    assert (rows.loc[["a", "b"], "status"] == "ok").all()
    status = rows.loc["x", "status"]
    assert str(slides / "x.svs") in status and "never came back" in status
    assert f"died {READ_RETRIES + 1} times" in status and "\n" not in status
    assert rows.loc["x", "slide_uri"] == str(slides / "x.svs")
    assert sorted(set(table(str(tmp_path / "out"), "tiles.parquet")["slide"])) == ["a", "b"]
    assert not (tmp_path / "out" / "x.json").exists()  # a rerun tries it again
    skipped = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "x.svs" in skipped[0], captured.err
    assert "1 failed" in captured.out.replace("\n", " ")
