"""`qserve-lite bench --vlm` on the CPU (the runner's numpy twin) with a tiny VILA shape: it runs the
stream of images through the engine and writes its JSON line."""

from __future__ import annotations

import json

from vila_fixtures import VISION, llm_config, vila_config

from qserve_lite.cli import main


def test_bench_vlm_tiny(tmp_path, capsys):
    shape = tmp_path / "tiny-vila.json"
    shape.write_text(json.dumps(vila_config(llm_config(head_dim=64, num_attention_heads=1), VISION)))
    out = tmp_path / "vlm.jsonl"
    rc = main(["bench", "--vlm", str(shape), "--device", "cpu", "--batch", "3,4", "--num-requests", "7",
               "--gen", "5", "--text-tokens", "6", "--precision", "w4a8kv4", "--group-size", "-1",
               "--json-out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch"] for r in rows] == [3, 4]
    for r in rows:
        assert r["bench"] == "vlm" and r["num_images"] == 7 and r["generated_tokens"] == 7 * 5
        assert r["prompt_len"] == 6 + 9 and r["image_tokens"] == 9 and r["precision"] == "w4a8kv4"
        assert r["images_per_s"] > 0 and r["tok_s"] > 0 and r["wall_s"] >= r["vision_s"] > 0
    assert "images/s" in capsys.readouterr().out
    assert main(["bench", "--vlm", str(shape), "--device", "cpu", "--max-batch"]) == 2
