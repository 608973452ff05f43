"""Tests of shapes.py: the world (labels and captions against the drawn pixels), the tiny CLIP's helpers
and checkpoint, a short pretraining against random weights, and the whole demo at toy sizes."""
import json
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
from conftest import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = re.compile(r'\b(plain|striped|dotted)(?: and (plain|striped|dotted))? (light|dark) (red|yellow|green|blue|purple)\b')


def palette_class(pixels: np.ndarray) -> np.ndarray:
    """(n, 3) RGB -> (n,) index of the nearest class colour, each class's colour and its pattern shade
    (0.55 x) both counting as the class: an independent reading of what was drawn."""
    colours = np.array([shapes.COLOURS[c] for c in shapes.CLASSES], dtype=np.float32)  # (K, 3)
    candidates = np.concatenate([colours, 0.55 * colours])  # (2K, 3)
    distance = ((pixels[:, None, :].astype(np.float32) - candidates[None]) ** 2).sum(-1)  # (n, 2K)
    return distance.argmin(1) % len(shapes.CLASSES)


def is_shade(pixels: np.ndarray) -> np.ndarray:
    """(n, 3) RGB -> (n,) bool: nearer a class's pattern shade (0.55 x) than to any class colour."""
    colours = np.array([shapes.COLOURS[c] for c in shapes.CLASSES], dtype=np.float32)  # (K, 3)
    candidates = np.concatenate([colours, 0.55 * colours])  # (2K, 3)
    distance = ((pixels[:, None, :].astype(np.float32) - candidates[None]) ** 2).sum(-1)  # (n, 2K)
    return distance.argmin(1) >= len(shapes.CLASSES)


def test_preset_matches_world():
    assert list(shapes.COLOURS) == shapes.CLASSES == shapes.PRESET['classes']
    assert [shapes.CLASSES[k] for k in shapes.UNSEEN] == ['light yellow', 'dark blue', 'dark purple']


def test_labels_match_pixels_and_captions_name_what_is_drawn():
    rng = np.random.default_rng(0)
    agreement, shaded = [], {p: [] for p in shapes.PATTERNS}
    for _ in range(60):
        image, label, parts, objects = shapes.render_scene(rng)
        text = shapes.caption(objects, rng)
        drawn = sorted(int(k) - 1 for k in np.unique(label) if k > 0)
        # the caption names every object's colour exactly once, with the patterns of its halves
        named = [(first, second or first, f'{shade} {hue}') for first, second, shade, hue in NAME.findall(text)]
        assert sorted(shapes.CLASSES.index(c) for _, _, c in named) == sorted(
            shapes.CLASSES.index(o['colour']) for o in objects), text
        assert sorted({shapes.CLASSES.index(c) for _, _, c in named}) == drawn, (text, drawn)
        for k in drawn:  # the patterns named for a colour are the patterns drawn on its pixels
            in_caption = {p for first, second, c in named if c == shapes.CLASSES[k] for p in (first, second)}
            on_pixels = {shapes.PATTERNS[p - 1] for p in np.unique(parts[label == k + 1])}
            assert in_caption == on_pixels, (text, shapes.CLASSES[k], on_pixels)
        assert len(objects) >= 1 and np.array_equal(label > 0, parts > 0)
        inside = label > 0
        agreement.append(palette_class(image[inside]) == label[inside] - 1)
        for p, pattern in enumerate(shapes.PATTERNS):
            where = parts == p + 1
            shaded[pattern].append(is_shade(image[where]))
    agreement = np.concatenate(agreement)
    # the dark shade of light yellow lies between those of light red and light green: the few misses
    assert agreement.mean() > 0.97, f"only {agreement.mean():.4f} of labelled pixels have their class's colour"
    share = {p: np.concatenate(v).mean() for p, v in shaded.items()}  # the darker shade's share of each pattern
    assert share['plain'] < 0.02 and 0.2 < share['dotted'] < 0.5 and 0.35 < share['striped'] < 0.65, share


def test_world_on_disk(tmp_path):
    root = shapes.write_world(str(tmp_path), num_train=4, num_val=3, seed=5)
    # the same stream again, in memory: the files hold exactly these labels and (up to JPEG) images
    rng = np.random.default_rng([6, 20240924])  # the val split's stream: seed + 1
    dataset = data.SegmentationDataset(os.path.join(root, shapes.PRESET_FILE), root, 'val', 'fully')  # as train.py
    assert len(dataset) == 3
    lines = (tmp_path / 'captions' / 'val.txt').read_text().splitlines()
    for i in range(3):
        image, label, _, objects = shapes.render_scene(rng)
        text = shapes.caption(objects, rng)
        assert lines[i] == f'val_{i:05d}\t{text}'
        assert np.array_equal(np.array(Image.open(tmp_path / 'annotations' / 'val' / f'val_{i:05d}.png')), label)
        jpeg = np.array(Image.open(tmp_path / 'images' / 'val' / f'val_{i:05d}.jpg'), dtype=np.float32)
        assert np.abs(jpeg - image).mean() < 4, np.abs(jpeg - image).mean()
        sample = dataset[i]  # data.py's view: background 255, class k + 1 -> k
        expected = torch.from_numpy(label.astype(np.int64) - 1).masked_fill(torch.from_numpy(label == 0), 255)
        assert torch.equal(sample['label'], expected)
    train = data.SegmentationDataset(shapes.PRESET, root, 'train', 'inductive')
    assert train.class_names == ['light red', 'dark red', 'dark yellow', 'light green', 'dark green', 'light blue',
                                 'light purple']


def test_twins_differ_in_patterns_only():
    images, labels, parts, captions, shown = shapes.scene_batch(np.random.default_rng(3), 16, twins=True)
    for a in range(0, 16, 2):
        assert torch.equal(labels[a], labels[a + 1])  # same objects in the same places
        outside = labels[a] == 0
        assert torch.equal(images[a][:, outside], images[a + 1][:, outside])  # same background and noise
    differ = [not torch.equal(parts[a], parts[a + 1]) for a in range(0, 16, 2)]
    assert sum(differ) >= 6, differ
    # what the captions say is what the pixels show: colour k with pattern p somewhere in scene i
    K, P = len(shapes.CLASSES), len(shapes.PATTERNS)
    on_pixels = torch.stack([((labels == k + 1) & (parts == p + 1)).flatten(1).any(dim=1)
                             for k in range(K) for p in range(P)], dim=1).view(16, K, P)
    assert torch.equal(shown, on_pixels)


def test_prompt_specialisation_by_hand():
    # one 16x16 scene, patches of 8: the left column striped, the right one dotted, all of class 0
    labels = torch.ones(1, 16, 16, dtype=torch.uint8)
    parts = torch.full((1, 16, 16), 1 + shapes.PATTERNS.index('dotted'), dtype=torch.uint8)
    parts[..., :8] = 1 + shapes.PATTERNS.index('striped')
    templates = ['a striped {} shape.', 'a dotted {} shape.', 'a plain {} shape.']
    # maps of class 0 over patches (0,0) (0,1) (1,0) (1,1): each prompt takes its own column
    maps = torch.zeros(1, 2, 3, 2, 2)
    maps[0, 0, 0] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    maps[0, 0, 1] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    maps[0, 0, 2] = torch.tensor([[-0.2, 0.1], [0.1, -0.2]])  # negative values count as 0 in the shares
    got = shapes.prompt_specialisation(maps, labels, parts, templates)
    # by hand: correlations -1 (prompts 0, 1) and 0 (prompt 2 with either): mean of 6 ordered pairs -1/3;
    # shares 1/1, 1/1.1, 1/1.1, 1/1; the named prompt is always on top
    expected = dict(correlation=-1 / 3, share=(2 + 2 / 1.1) / 4, top=1.0)
    for key, value in expected.items():
        assert abs(got[key] - value) < 1e-6, (key, got[key], value)
    same = shapes.prompt_specialisation(maps[:, :, :1].expand(1, 2, 3, 2, 2) + torch.arange(4.0).view(2, 2),
                                        labels, parts, templates)
    assert abs(same['correlation'] - 1) < 1e-6 and abs(same['share'] - 1 / 3) < 1e-6, same


def test_progress_lines(tmp_path, capsys):
    path = tmp_path / 'log.jsonl'
    path.write_text('{"event": "start"}\n{"step": 50, "loss": 0.5, "eta_s": 20.0}\n{"step": 100, "lo')
    offset = shapes.progress_lines(str(path), 0, 'run')
    assert offset == len('{"event": "start"}\n{"step": 50, "loss": 0.5, "eta_s": 20.0}\n')
    assert capsys.readouterr().out == '  run: step 50, loss 0.500, about 20 s to go\n'
    with open(path, 'a') as f:
        f.write('ss": 0.25, "eta_s": 10.0}\n')
    shapes.progress_lines(str(path), offset, 'run')  # the record finished since is printed once, whole
    assert capsys.readouterr().out == '  run: step 100, loss 0.250, about 10 s to go\n'


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
    # colours well above chance (0.10), patterns above chance (1/3) too
    assert quality['image'] > 0.8 and quality['patch'] > 0.8 and quality['pattern'] > 0.42, quality


def test_short_pretraining_beats_random_weights():
    torch.manual_seed(0)
    model, history = shapes.pretrain(steps=40, batch_size=48, lr=1e-3, warmup=10, log_every=40, log=lambda s: None)
    before, after = history[0], history[-1]
    assert after['image'] > before['image'] + 0.1, (before, after)  # measured: 0.20 -> 0.35
    assert after['patch'] > before['patch'] + 0.15, (before, after)  # measured: 0.12 -> 0.32


def test_demo_end_to_end(tmp_path):
    out = tmp_path / 'demo'
    picture = tmp_path / 'fig5.png'
    result = subprocess.run([sys.executable, 'shapes.py', '--out', str(out), '--num-train', '24', '--num-val', '4',
                             '--iters', '4', '--num-pictures', '1', '--compare', '--picture', str(picture)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (out / 'results.txt').read_text()
    assert table in result.stdout
    assert result.stdout.count('train.py pretrained-sinkhorn: step') == 4  # progress while training (every step here)
    rows = [line for line in table.splitlines() if line.startswith(('pretrained', 'random init'))]
    assert len(rows) == 6
    # Each row against evaluate.py's own report of that run, recomputed from its per-class IoU: the means
    # over seen and unseen classes and their harmonic mean. Seen classes are labelled in the validation
    # scenes, so mIoU(S) is a number, never NaN.
    runs = ['pretrained-sinkhorn'] * 2 + ['pretrained-softmax'] * 2 + ['random-sinkhorn'] * 2
    for row, run, key in zip(rows, runs, ['OTSeg', 'OTSeg+'] * 3):
        report = json.loads((out / run / 'eval.json').read_text())
        iou = np.array([np.nan if x is None else x for x in report['results'][key]['iou']], dtype=float)
        unseen = ~shapes.SEEN.numpy()
        seen_mean = np.nanmean(iou[~unseen])
        unseen_mean = np.nanmean(iou[unseen]) if not np.isnan(iou[unseen]).all() else np.nan
        expected = [seen_mean, unseen_mean, 2 * seen_mean * unseen_mean / (seen_mean + unseen_mean)]
        numbers = [float(x) for x in row.split()[-3:]]
        assert not np.isnan(numbers[0]), row
        assert_close(numbers, expected, atol=0.051, equal_nan=True, what=row)
    measured = json.loads((out / 'results.json').read_text())['prompts']
    for maps in ('cosine', 'mps'):
        assert -1 <= measured[maps]['correlation'] <= 1 and 0 <= measured[maps]['share'] <= 1, measured
    assert (out / 'pictures' / 'prompts.png').read_bytes() == picture.read_bytes()
    assert Image.open(picture).size[0] > 500
    pictures = sorted(os.listdir(out / 'pictures' / 'pretrained-sinkhorn'))
    assert any(p.endswith('_prediction.png') for p in pictures) and any('_prompts_' in p for p in pictures)
