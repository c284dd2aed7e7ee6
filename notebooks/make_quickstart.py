import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# uge-hf quickstart: protect, publish, train with the key

This notebook walks the whole journey on a small CIFAR-10 subset, on a CPU, in a few minutes:

1. create the **key** (an architecture plus its initial weights θ0),
2. **protect** 500 training images (the `fast` preset; the benchmarked default is stronger and slower),
3. look at clean vs protected images and the amplified perturbation, and at the dataset card,
4. load the data back **with the key** (a wrong key is refused),
5. train the authorized model and one hacker model on the protected data and compare their test accuracy curves.

The data is the offline copy of `uoft-cs/cifar10` in `../shared/data/cifar10` (set `UGE_HF_CIFAR10` to point elsewhere)."""),
code("""import os, tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from datasets import load_dataset

from uge_hf import AuthorizedModel, ProtectConfig, load_protected, protect
from uge_hf.data import load_tensors
from uge_hf.models import create_model
from uge_hf.training import TrainConfig, accuracy, train_model

torch.manual_seed(0)
data_dir = os.environ.get("UGE_HF_CIFAR10", "../../shared/data/cifar10")
cifar = load_dataset(data_dir)
train = cifar["train"].select(range(500))
test = cifar["test"].select(range(1000))
work = Path(tempfile.mkdtemp(prefix="uge-quickstart-"))
print(train)"""),
md("## 1-2. The key, and protection"),
code("""key = AuthorizedModel.create("convnet", num_classes=10, seed=0)
key.save_pretrained(work / "key")          # share this folder only with the authorized party
print(key)

protected = protect(train, key, ProtectConfig.preset("fast", batch_size=250), output_dir=work / "cifar10-uge", verbose=False)
print(protected)
print(sorted(p.relative_to(work / "cifar10-uge").as_posix() for p in (work / "cifar10-uge").rglob("*") if p.is_file()))"""),
md("## 3. What the protection looks like\n\nTop: clean images. Middle: protected (‖δ‖∞ ≤ 8/255, invisible). Bottom: the perturbation, amplified 8×."),
code("""clean_x, labels = load_tensors(train, "img", "label", 3, rows=range(8), verbose=False)
prot_x, _ = load_tensors(protected["train"], "img", "label", 3, rows=range(8), verbose=False)
delta = prot_x.float() - clean_x.float()
print("max |delta| on the 0-255 scale:", int(delta.abs().max()))
fig, axes = plt.subplots(3, 8, figsize=(12, 4.8))
names = train.features["label"].names
for i in range(8):
    axes[0, i].imshow(clean_x[i].permute(1, 2, 0).numpy()); axes[0, i].set_title(names[labels[i]], fontsize=8)
    axes[1, i].imshow(prot_x[i].permute(1, 2, 0).numpy())
    axes[2, i].imshow(((delta[i] * 8 + 128).clamp(0, 255) / 255).permute(1, 2, 0).numpy())
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
md("The dataset card records the key's hash, the method and its parameters:"),
code("""card = (work / "cifar10-uge" / "README.md").read_text()
print(card[card.index("uge_hf:"):card.index("---", card.index("uge_hf:"))][:900])"""),
md("## 4. Loading with the key\n\n`load_protected` checks the key against the card (and every shard against its hash) before returning anything."),
code("""ds, model = load_protected(work / "cifar10-uge", authorized_model=work / "key")
print("authorized: loaded", len(ds["train"]), "rows and the key model")
try:
    load_protected(work / "cifar10-uge", authorized_model=key.sibling(7))
except ValueError as error:
    print("refused:", str(error)[:160], "...")"""),
md("## 5. Who learns from it?\n\nThe authorized model trains from θ0; the hacker trains a VGG-style network from scratch. Same recipe, same data, test accuracy after each epoch. On 500 images and a few epochs everything is weak; the benchmark in the README runs the real protocol."),
code("""x_prot, y = load_tensors(ds["train"], "img", "label", 3, verbose=False)
x_test, y_test = load_tensors(test, "img", "label", 3, verbose=False)
recipe = TrainConfig(epochs=6, batch_size=64)

def curve(model):
    accs = []
    train_model(model, x_prot, y, recipe, seed=0, verbose=False,
                on_epoch_end=lambda epoch, m, opt: (accs.append(accuracy(m, x_test, y_test)), m.train()))
    return accs

curves = {"authorized (key θ0)": curve(model)}
torch.manual_seed(1000)
curves["hacker (vgg-small)"] = curve(create_model("vgg-small", 10))
for name, accs in curves.items():
    plt.plot(range(1, len(accs) + 1), accs, marker="o", label=name)
plt.xlabel("epoch"); plt.ylabel("clean test accuracy (%)"); plt.legend(); plt.title("Training on the protected data")
plt.show()
{k: round(v[-1], 1) for k, v in curves.items()}"""),
md("""## Next

- `uge-hf push cifar10-uge you/cifar10-uge` publishes the folder (private by default); `uge-hf verify you/cifar10-uge --key key/` checks a key.
- `python bench/efficacy.py` runs the full efficacy benchmark (5,000 images, 15 epochs, five hacker architectures)."""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/quickstart.ipynb")
