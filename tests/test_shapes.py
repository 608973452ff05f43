"""Tests of shapes.py: the world (labels and captions against the drawn pixels), the tiny CLIP's helpers
and checkpoint, a short pretraining against random weights, and the whole demo at toy sizes."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import data
import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = re.compile(r'\b(light|dark) (red|yellow|green|blue|purple)\b')


def palette_class(pixels: np.ndarray) -> np.ndarray:
    """(n, 3) RGB -> (n,) index of the nearest class colour, each class's colour and its pattern shade
    (0.55 x) both counting as the class: an independent reading of what was drawn."""
    colours = np.array([shapes.COLOURS[c] for c in shapes.CLASSES], dtype=np.float32)  # (K, 3)
    candidates = np.concatenate([colours, 0.55 * colours])  # (2K, 3)
    distance = ((pixels[:, None, :].astype(np.float32) - candidates[None]) ** 2).sum(-1)  # (n, 2K)
    return distance.argmin(1) % len(shapes.CLASSES)


def test_preset_matches_world():
    assert list(shapes.COLOURS) == shapes.CLASSES == data.DATASETS['shapes']['classes']
    assert [shapes.CLASSES[k] for k in shapes.UNSEEN] == ['light yellow', 'dark blue', 'dark purple']


def test_labels_match_pixels_and_captions_name_what_is_drawn():
    rng = np.random.default_rng(0)
    agreement = []
    for _ in range(60):
        image, label, objects = shapes.render_scene(rng)
        text = shapes.caption(objects, rng)
        drawn = sorted(int(k) - 1 for k in np.unique(label) if k > 0)
        # the caption names every object's colour exactly once, and nothing else
        named = sorted(shapes.CLASSES.index(' '.join(m)) for m in NAME.findall(text))
        assert named == sorted(shapes.CLASSES.index(o['colour']) for o in objects), text
        assert sorted(set(named)) == drawn, (text, drawn)
        assert len(objects) >= 1
        inside = label > 0
        agreement.append(palette_class(image[inside]) == label[inside] - 1)
    agreement = np.concatenate(agreement)
    assert agreement.mean() > 0.99, f"only {agreement.mean():.4f} of labelled pixels have their class's colour"


def test_world_on_disk(tmp_path):
    root = shapes.write_world(str(tmp_path), num_train=4, num_val=3, seed=5)
    # the same stream again, in memory: the files hold exactly these labels and (up to JPEG) images
    rng = np.random.default_rng([6, 20240924])  # the val split's stream: seed + 1
    dataset = data.SegmentationDataset('shapes', root, 'val', 'fully')
    assert len(dataset) == 3
    lines = (tmp_path / 'captions' / 'val.txt').read_text().splitlines()
    for i in range(3):
        image, label, objects = shapes.render_scene(rng)
        text = shapes.caption(objects, rng)
        assert lines[i] == f'val_{i:05d}\t{text}'
        assert np.array_equal(np.array(Image.open(tmp_path / 'annotations' / 'val' / f'val_{i:05d}.png')), label)
        jpeg = np.array(Image.open(tmp_path / 'images' / 'val' / f'val_{i:05d}.jpg'), dtype=np.float32)
        assert np.abs(jpeg - image).mean() < 4, np.abs(jpeg - image).mean()
        sample = dataset[i]  # data.py's view: background 255, class k + 1 -> k
        expected = torch.from_numpy(label.astype(np.int64) - 1).masked_fill(torch.from_numpy(label == 0), 255)
        assert torch.equal(sample['label'], expected)
    train = data.SegmentationDataset('shapes', root, 'train', 'inductive')
    assert train.class_names == ['light red', 'dark red', 'dark yellow', 'light green', 'dark green', 'light blue',
                                 'light purple']


@pytest.fixture(scope='module')
def random_clip():
    torch.manual_seed(0)
    return shapes.CLIP(**shapes.TINY_CLIP, double_cls_embedding=False).eval()


def test_encode_captions_is_encode_text(random_clip):
    tokens = clip.tokenize(['a photo of a dark red star.', 'a light blue thing and a striped dark green circle.'])
    with torch.no_grad():
        diff = (random_clip.encode_text(tokens) - shapes.encode_captions(random_clip, tokens)).abs().max()
    assert diff < 1e-5, diff


def test_checkpoint_round_trip(random_clip, tmp_path):
    path = str(tmp_path / 'tiny.pt')
    shapes.save_checkpoint(random_clip, path, command='test', seed=0)
    assert os.path.getsize(path) < 2e6
    state_dict = shapes.clip_state_dict(path)
    original = random_clip.state_dict()
    assert state_dict.keys() == original.keys()
    for name, value in original.items():
        if name != 'token_embedding.weight':
            assert torch.equal(state_dict[name], value), name
    ids = shapes.world_token_ids()
    assert torch.equal(state_dict['token_embedding.weight'][ids], original['token_embedding.weight'][ids])
    rebuilt = clip.build_model(state_dict)
    texts = [t.format(name) for t in shapes.TEMPLATES for name in shapes.CLASSES]  # words of the world only
    with torch.no_grad():
        diff = (rebuilt.encode_text(clip.tokenize(texts)) - random_clip.encode_text(clip.tokenize(texts))).abs().max()
    assert diff < 1e-5, diff


def test_shipped_checkpoint_loads_and_knows_the_colours(tmp_path):
    meta = shapes.read_checkpoint(shapes.CHECKPOINT)
    assert meta['command'].startswith('python shapes.py pretrain') and isinstance(meta['seed'], int)
    assert os.path.getsize(shapes.CHECKPOINT) < 3e6
    path = str(tmp_path / 'full.pt')
    torch.save(shapes.clip_state_dict(shapes.CHECKPOINT), path)
    model = clip.load(path, double_cls_embedding=False)  # a plain state dict, as train.py loads it
    quality = shapes.zero_shot_quality(model, *shapes.quality_set())
    recorded = meta['history'][-1]
    for key in ('image', 'patch'):  # the recorded quality is reproduced by the shipped weights
        assert abs(quality[key] - recorded[key]) < 1e-3, (key, quality[key], recorded[key])
    assert quality['image'] > 0.8 and quality['patch'] > 0.4, quality


def test_short_pretraining_beats_random_weights():
    torch.manual_seed(0)
    model, history = shapes.pretrain(steps=40, batch_size=48, lr=3e-3, warmup=10, log_every=40, log=lambda s: None)
    before, after = history[0], history[-1]
    assert after['image'] > before['image'] + 0.15, (before, after)  # measured: 0.17 -> 0.40
    assert after['patch'] > before['patch'] + 0.15, (before, after)  # measured: 0.07 -> 0.31


def test_demo_end_to_end(tmp_path):
    out = tmp_path / 'demo'
    result = subprocess.run([sys.executable, 'shapes.py', '--out', str(out), '--num-train', '24', '--num-val', '4',
                             '--iters', '3', '--num-pictures', '1'], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (out / 'results.txt').read_text()
    assert table in result.stdout
    rows = [line for line in table.splitlines() if line.startswith(('pretrained', 'random init'))]
    assert len(rows) == 6
    for row in rows:  # three numbers, each a percentage (or nan)
        numbers = [float(x) for x in row.split()[-3:]]
        assert all(0 <= x <= 100 or np.isnan(x) for x in numbers), row
    for run in ('pretrained-sinkhorn', 'random-sinkhorn'):
        pictures = sorted(os.listdir(out / 'pictures' / run))
        assert any(p.endswith('_prediction.png') for p in pictures) and any('_prompts_' in p for p in pictures)
