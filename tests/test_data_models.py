"""Data loading on the shared ImageNette sample and on hand-made folders; checkpoint loading."""


import pytest
import torch
import torchvision
from PIL import Image

from dntk import DNTKError
from dntk.data import balanced_indices, digits, image_folder, load_split, load_splits, scan_folder
from dntk.models import SmallCNN, build_model, load_checkpoint, penultimate, resnet18


def test_digits_split_is_stratified_and_disjoint():
    tr, te = digits("train"), digits("val")
    assert len(tr) + len(te) == 1797 and tr.num_classes == 10
    assert tr.images.dtype == torch.uint8 and tr.image_shape == (1, 8, 8)
    assert min(te.class_counts()) >= 40
    x, y = tr[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    assert abs(float(tr.tensors()[0].mean())) < 1e-4  # normalised with train statistics


def test_imagenette_sample_with_greyscale_images(sample_root):
    classes, samples = scan_folder(sample_root, "train")
    assert len(classes) == 10 and len(samples) == 1000
    grey = []
    for path, _ in samples:
        with Image.open(path) as im:
            if im.mode == "L":
                grey.append(path)
        if grey:
            break
    assert grey, "the sample is documented to contain greyscale photos"
    ds = image_folder(sample_root, "val", image_size=24)
    assert ds.images.shape == (500, 3, 24, 24) and ds.classes == classes
    assert ds.class_counts() == [50] * 10
    idx = ds.files.index(next(p for p, _ in scan_folder(sample_root, "val")[1] if _is_grey(p)))
    img = ds.images[idx].float()
    assert torch.allclose(img[0], img[1]) and torch.allclose(img[1], img[2])  # grey → identical RGB planes


def _is_grey(path):
    with Image.open(path) as im:
        return im.mode == "L"


def _make_tree(root, classes_train=("a", "b"), classes_val=("a", "b"), n=3, size=(20, 14)):
    for split, classes in (("train", classes_train), ("val", classes_val)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, (40 * ci, 10 * i, 100)).save(d / f"{i}.png")


def test_other_sizes_and_aspect_ratios(tmp_path):
    _make_tree(tmp_path, ("x", "y", "z"), ("x", "y", "z"), size=(37, 15))
    tr, va = load_splits("folder", root=tmp_path, image_size=12)
    assert tr.images.shape == (9, 3, 12, 12) and tr.classes == ["x", "y", "z"]


def test_cache_reuses_decoded_tensor(tmp_path):
    _make_tree(tmp_path / "d")
    a = image_folder(tmp_path / "d", "train", 8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    b = image_folder(tmp_path / "d", "train", 8, cache_dir=tmp_path / "cache")
    assert torch.equal(a.images, b.images)


def test_folder_errors(tmp_path):
    with pytest.raises(DNTKError, match="does not exist"):
        load_split("folder", "train", root=tmp_path / "nope")
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DNTKError, match="no image files"):
        load_split("folder", "train", root=tmp_path / "empty")
    _make_tree(tmp_path / "mismatch", ("a", "b"), ("a", "c"))
    with pytest.raises(DNTKError, match=r"only in train: \['b'\]; only in val: \['c'\]"):
        load_splits("folder", root=tmp_path / "mismatch", image_size=8)
    _make_tree(tmp_path / "broken")
    (tmp_path / "broken" / "train" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DNTKError, match=r"cannot read image .*bad\.jpg"):
        load_split("folder", "train", root=tmp_path / "broken", image_size=8)
    with pytest.raises(DNTKError, match="valid names: digits, folder, imagenette"):
        load_split("cifar", "train")


def test_balanced_indices_prefixes_are_balanced():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    idx = balanced_indices(labels, 9, 3)
    assert torch.bincount(labels[idx[:6]]).tolist() == [2, 2, 2]
    with pytest.raises(DNTKError, match="larger than the training set"):
        balanced_indices(labels, 31, 3)


def test_models_and_penultimate():
    assert not isinstance(resnet18(10, image_size=64).maxpool, torch.nn.Identity)
    assert resnet18(10, image_size=64, stem="imagenet").conv1.kernel_size == (7, 7)
    m = resnet18(10, image_size=32)
    assert isinstance(m.maxpool, torch.nn.Identity) and m.conv1.stride == (1, 1)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet18(10, image_size=224).conv1.kernel_size == (7, 7)
    assert penultimate(SmallCNN(1, 10).eval(), torch.randn(3, 1, 8, 8)).shape == (3, 64)
    with pytest.raises(DNTKError, match="valid names: resnet18, small_cnn"):
        build_model("vit", 10)


def test_checkpoint_key_layouts(tmp_path):
    src = torchvision.models.resnet18(num_classes=10)
    state = src.state_dict()
    wmdd = {}
    for k, v in state.items():
        k = k.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.norm.")
        wmdd["module." + k] = v
    torch.save({"state_dict": wmdd}, tmp_path / "wmdd.pt")
    dst = load_checkpoint(torchvision.models.resnet18(num_classes=10), tmp_path / "wmdd.pt")
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k])
    model_prefixed = {"model." + k: v for k, v in state.items()}
    load_checkpoint(torchvision.models.resnet18(num_classes=10), model_prefixed)


def test_checkpoint_mismatch_errors():
    with pytest.raises(DNTKError, match="checkpoint has 5 classes, the data 10"):
        load_checkpoint(torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=5))
    with pytest.raises(DNTKError, match=r"(?s)another architecture.*missing keys \(\d+\)"):
        load_checkpoint(torchvision.models.resnet18(num_classes=10), SmallCNN(3, 10))


def test_imagenette_from_a_local_tree_and_no_silent_download(sample_root, tmp_path):
    ds = load_split("imagenette", "val", root=sample_root, image_size=16)
    assert ds.images.shape == (500, 3, 16, 16)
    with pytest.raises(DNTKError, match="pass --download"):
        load_split("imagenette", "train", root=tmp_path, image_size=16)
