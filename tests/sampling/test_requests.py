"""Parsing sampling requests: prompts files (text, JSONL), class lists, counts, and their errors."""
import json

import pytest

from latent_diffusion.sampling.requests import (
    RequestError, WorkItem, build_requests, parse_classes, parse_prompt_lines, unconditional_items)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_text_prompts_skip_blank_lines_with_a_warning(tmp_path):
    path = write(tmp_path, "p.txt", "a red cube\n\n  a blue ball  \n   \nthe end\n\n")
    with pytest.warns(UserWarning, match=r"skipped 3 blank line\(s\) \(line 2, 4, 6\)"):
        items = build_requests(prompts=path, seed=11)
    assert items == [WorkItem(0, 11, prompt="a red cube"), WorkItem(1, 11, prompt="a blue ball"),
                     WorkItem(2, 11, prompt="the end")]


def test_samples_per_prompt_number_items_consecutively(tmp_path):
    path = write(tmp_path, "p.txt", "cat\ndog\n")
    items = build_requests(prompts=path, seed=0, num_samples=3)
    assert [(it.index, it.prompt) for it in items] == [(0, "cat"), (1, "cat"), (2, "cat"),
                                                       (3, "dog"), (4, "dog"), (5, "dog")]


def test_jsonl_fields_and_seed_override(tmp_path):
    lines = [{"prompt": "cat", "seed": 5, "guidance": 7.5, "negative_prompt": "blurry", "steps": 20},
             {"prompt": "dog"}, {"label": 3}, {"prompt": "fox", "label": 1, "guidance": 0}]
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    items = build_requests(prompts=path, seed=9, num_classes=4, num_samples=2)
    assert items[0] == WorkItem(0, 5, prompt="cat", negative_prompt="blurry", guidance=7.5, steps=20)
    assert items[1] == WorkItem(1, 5, prompt="cat", negative_prompt="blurry", guidance=7.5, steps=20)
    assert items[2] == WorkItem(2, 9, prompt="dog")
    assert items[4] == WorkItem(4, 9, label=3)
    assert items[7] == WorkItem(7, 9, prompt="fox", label=1, guidance=0.0)


def test_jsonl_is_detected_without_the_suffix():
    items = parse_prompt_lines(['{"prompt": "x", "seed": 1}\n'], seed=0)
    assert items == [WorkItem(0, 1, prompt="x")]


@pytest.mark.parametrize("record,message", [
    ({"prompt": "x", "guidance": 51}, r"line 2: guidance scale must be a number in \[0, 50\].*51"),
    ({"prompt": "x", "guidance": -0.5}, r"line 2: guidance scale .* got -0.5"),
    ({"prompt": "x", "steps": 0}, r"line 2: steps must be an integer in \[1, 1000\], got 0"),
    ({"prompt": "x", "steps": 1001}, r"line 2: steps .* got 1001"),
    ({"prompt": "x", "steps": 2.5}, r"line 2: steps .* got 2.5"),
    ({"prompt": "x", "scale": 3}, r"line 2: unknown field\(s\) \['scale'\]; allowed fields are"),
    ({"prompt": "x", "seed": -1}, r"line 2: seed must be an integer in \[0, 2\*\*32\)"),
    ({"prompt": ""}, r"line 2: 'prompt' must be a non-empty string"),
    ({"negative_prompt": "x"}, r"line 2: a record needs a 'prompt' or a 'label'"),
    ({"label": 4}, r"line 2: class id 4 is outside \[0, 4\)"),
    ({"label": "cat"}, r"line 2: class label must be an integer"),
])
def test_jsonl_errors_name_the_line(tmp_path, record, message):
    path = write(tmp_path, "p.jsonl", json.dumps({"prompt": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(RequestError, match=message) as info:
        build_requests(prompts=path, seed=0, num_classes=4)
    assert path in str(info.value)


def test_jsonl_syntax_error(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n')
    with pytest.raises(RequestError, match=r"line 2: not valid JSON"):
        build_requests(prompts=path, seed=0)
    with pytest.raises(RequestError, match="expected a JSON object"):
        parse_prompt_lines(["[1, 2]"], seed=0, jsonl=True)


def test_empty_or_missing_prompts_file(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(RequestError, match="no prompts found"):
        build_requests(prompts=write(tmp_path, "e.txt", "\n\n"), seed=0)
    with pytest.raises(RequestError, match="does not exist"):
        build_requests(prompts=str(tmp_path / "nope.txt"), seed=0)


def test_class_list_and_file(tmp_path):
    assert [(it.index, it.label) for it in build_requests(classes="3, 1,3", seed=2, num_classes=10)] == [
        (0, 3), (1, 1), (2, 3)]
    path = write(tmp_path, "c.txt", "0 1\n2,3\n\n")
    assert [it.label for it in parse_classes(path, seed=0, num_classes=4, samples_per_item=2)] == [
        0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(RequestError, match=r"class list: class id 10 is outside \[0, 10\)"):
        build_requests(classes="1,10", seed=0, num_classes=10)
    with pytest.raises(RequestError, match="class id -1 is outside"):
        build_requests(classes="-1", seed=0, num_classes=10)
    with pytest.raises(RequestError, match=r"c2.txt, line 2: 'x' is not an integer class id"):
        build_requests(classes=write(tmp_path, "c2.txt", "1\nx\n"), seed=0, num_classes=10)
    with pytest.raises(RequestError, match=r"c3.txt, line 3: class id 7 is outside \[0, 5\)"):
        build_requests(classes=write(tmp_path, "c3.txt", "1\n2\n7\n"), seed=0, num_classes=5)
    with pytest.raises(RequestError, match="no class ids"):
        build_requests(classes=" , ", seed=0, num_classes=5)


def test_unconditional_count_and_source_errors(tmp_path):
    assert unconditional_items(3, seed=4) == [WorkItem(0, 4), WorkItem(1, 4), WorkItem(2, 4)]
    assert build_requests(num_samples=2, seed=1) == [WorkItem(0, 1), WorkItem(1, 1)]
    with pytest.raises(RequestError, match="positive integer"):
        build_requests(num_samples=0, seed=1)
    with pytest.raises(RequestError, match="nothing to sample"):
        build_requests(seed=1)
    with pytest.raises(RequestError, match="not both"):
        build_requests(prompts="p.txt", classes="1", seed=1)
    with pytest.raises(RequestError, match="job seed: seed must be"):
        build_requests(num_samples=1, seed=2 ** 32)


def test_jsonl_inputs_of_the_image_modes(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("in/photo.png", "in/hole.png", "seg.png"):
        (tmp_path / name).write_bytes(b"")  # existence is checked here; decoding when sampling
    lines = [{"prompt": "cat", "image": "in/photo.png", "mask": "in/hole.png"},
             {"image": "in/photo.png", "strength": 0.25},
             {"layout": [{"label": 3, "bbox": [0.1, 0.2, 0.5, 0.6]}, {"label": 0, "bbox": [0, 0, 1, 1]}]},
             {"segmentation": str(tmp_path / "seg.png"), "layout": []}]
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    items = build_requests(prompts=path, seed=1)
    photo, hole = str(tmp_path / "in" / "photo.png"), str(tmp_path / "in" / "hole.png")
    assert items[0] == WorkItem(0, 1, prompt="cat", image=photo, mask=hole)
    assert items[1] == WorkItem(1, 1, image=photo, strength=0.25)
    assert items[2] == WorkItem(2, 1, layout=((3, (0.1, 0.2, 0.5, 0.6)), (0, (0.0, 0.0, 1.0, 1.0))))
    assert items[3] == WorkItem(3, 1, segmentation=str(tmp_path / "seg.png"), layout=())


@pytest.mark.parametrize("record,message", [
    ({"image": "nope.png"}, r"line 2: image file .*nope.png' does not exist \(relative paths are read from the "
                            r"JSONL file's folder\)"),
    ({"prompt": "x", "mask": "ok.png"}, r"line 2: a 'mask' needs the 'image' it belongs to"),
    ({"image": 3}, r"line 2: 'image' must be the path of an image file"),
    ({"image": "ok.png", "strength": 1.5}, r"line 2: strength must be a number in \[0, 1\]"),
    ({"layout": {"label": 1}}, r"line 2: 'layout' must be a list of objects"),
    ({"layout": [{"label": 1}]}, r"line 2: layout object 0 must have exactly 'label' and 'bbox'"),
    ({"layout": [{"label": -1, "bbox": [0, 0, 1, 1]}]}, r"layout object 0: label must be a non-negative"),
    ({"layout": [{"label": 1, "bbox": [0.5, 0, 0.2, 1]}]}, r"layout object 0: bbox must be \[ymin, xmin"),
    ({"layout": [{"label": 1, "bbox": [0, 0, 1.2, 1]}]}, r"layout object 0: bbox must be"),
    ({"strength": 0.5}, r"line 2: a record needs a 'prompt' or a 'label'"),
])
def test_jsonl_input_errors_name_the_line(tmp_path, record, message):
    (tmp_path / "ok.png").write_bytes(b"")
    path = write(tmp_path, "p.jsonl", json.dumps({"prompt": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(RequestError, match=message):
        build_requests(prompts=path, seed=0)
