"""The parameter-efficient recipes (lora, ia3, bitfit, residual_adapters) against their papers
on a hand-sized model, their bad input, every registered trunk, their checkpoints of trained
parameters, and one `mtl compare` cell end to end."""

import io
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl.builders import build_recipe
from mtl.cli import main
from mtl.config import ConfigError, resolve
from mtl.heads import LinearHead
from mtl.model import MultiTaskModel
from mtl.recipes import IA3, BitFit, FineTune, LinearProbe, LoRA, ResidualAdapters
from mtl.trunks import TRUNKS, Trunk, build_trunk
from mtl.trunks.text import minilm_path

from conftest import QUICKSTART, ROOT, quick
from test_trunks import SPECS

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(Trunk):
    """conv 1→2 3×3 (bias) → BN(2) → mean over space → linear 2→3 (bias): 3 features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)

    def layer_groups(self):
        return [("conv", self.conv), ("fc", self.fc)]

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


HEAD = ["heads.a.fc.weight", "heads.a.fc.bias"]  # 3 features → 2 classes: 8 parameters


def tiny(recipe, seed=0):
    """The tiny model with ``recipe`` set up, at the start of epoch 0 as the trainer leaves it."""
    torch.manual_seed(seed)
    model = MultiTaskModel(Tiny(), {"a": LinearHead((3,), 2)})
    recipe.setup(model)
    model.train()
    recipe.start_epoch(model, 0)
    return model


def trainable(model):
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    return sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))


X = torch.randn(8, 1, 5, 5, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1] * 4)


def step(model, lr=0.1):
    """One Adam step on a cross-entropy loss over the parameters that require gradients."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    F.cross_entropy(model(X)["a"], Y).backward()
    optimizer.step()


def output(model):
    """The model's output on X in eval mode (BatchNorm on its running statistics), modes kept."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(X)["a"]
    finally:
        for m, mode in modes.items():
            m.train(mode)


def base_output(model):
    """The trunk as set up, without its adapters' contribution: peft's adapters disabled."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        return model.trunk(X)
    finally:
        for m in layers:
            m.enable_adapters(True)


# -- what each recipe trains, counted by hand ------------------------------------------------


def test_lora_trains_low_rank_factors_of_each_layer_and_the_heads():
    model = tiny(LoRA(rank=2))
    # conv: A 2 × (1·3·3), B 2 × 2 (1×1 conv); fc: A 2 × 2, B 3 × 2.
    assert trainable(model) == {
        "trunk.conv.lora_A.default.weight": 18, "trunk.conv.lora_B.default.weight": 4,
        "trunk.fc.lora_A.default.weight": 4, "trunk.fc.lora_B.default.weight": 6,
        "heads.a.fc.weight": 6, "heads.a.fc.bias": 2,
    }


def test_ia3_trains_one_scale_per_output_or_feedforward_input_and_the_heads():
    model = tiny(IA3())
    assert trainable(model) == {"trunk.conv.ia3_l.default": 2, "trunk.fc.ia3_l.default": 3, **dict.fromkeys(HEAD[:1], 6), HEAD[1]: 2}
    model = tiny(IA3(target_modules=["fc"], feedforward_modules=["fc"]))
    assert trainable(model) == {"trunk.fc.ia3_l.default": 2, "heads.a.fc.weight": 6, "heads.a.fc.bias": 2}  # fc's 2 inputs


def test_bitfit_trains_every_bias_and_the_heads():
    model = tiny(BitFit())
    assert trainable(model) == {"trunk.conv.bias": 2, "trunk.bn.bias": 2, "trunk.fc.bias": 3, "heads.a.fc.weight": 6, "heads.a.fc.bias": 2}


def test_residual_adapters_train_the_adapter_the_trunk_batchnorm_and_the_heads():
    model = tiny(ResidualAdapters())
    # After the 3×3 conv only: adapter BN γ, β (2 + 2), 1×1 conv 2 × 2; the trunk's BN γ, β.
    assert trainable(model) == {
        "trunk.bn.weight": 2, "trunk.bn.bias": 2,
        "trunk.residual_adapters.conv.norm.weight": 2, "trunk.residual_adapters.conv.norm.bias": 2,
        "trunk.residual_adapters.conv.conv.weight": 4,
        "heads.a.fc.weight": 6, "heads.a.fc.bias": 2,
    }


# -- the formulas: start as the base model, change only through the adapters -----------------


def test_lora_starts_as_the_base_and_a_step_changes_only_b_a_by_w_plus_alpha_over_r_b_a():
    model = tiny(LoRA(rank=2, alpha=3.0))
    fresh = tiny(FineTune())
    assert torch.equal(output(model), output(fresh))  # B = 0
    before = state(model)
    step(model)
    # A's gradient is Bᵀ(...) = 0 at B = 0: the first step moves B (and the head) only.
    assert changed(before, model) == ["heads.a.fc.bias", "heads.a.fc.weight", "trunk.conv.lora_B.default.weight", "trunk.fc.lora_B.default.weight"]
    assert not torch.equal(model.trunk(X), base_output(model))
    step(model)  # now A moves too
    conv, fc, s = model.trunk.conv, model.trunk.fc, 3.0 / 2
    a, b = conv.lora_A["default"].weight, conv.lora_B["default"].weight
    weight = conv.base_layer.weight + s * (b.flatten(1) @ a.flatten(1)).view_as(conv.base_layer.weight)
    torch.testing.assert_close(conv(X), F.conv2d(X, weight, conv.base_layer.bias, padding=1))
    h = torch.randn(4, 2)
    weight = fc.base_layer.weight + s * fc.lora_B["default"].weight @ fc.lora_A["default"].weight
    torch.testing.assert_close(fc(h), F.linear(h, weight, fc.base_layer.bias))


def test_ia3_starts_as_the_base_and_rescales_outputs_or_feedforward_inputs():
    model = tiny(IA3(target_modules=["conv", "fc"], feedforward_modules=["fc"]))
    fresh = tiny(FineTune())
    assert torch.equal(output(model), output(fresh))  # l = 1
    before = state(model)
    step(model)
    assert changed(before, model) == ["heads.a.fc.bias", "heads.a.fc.weight", "trunk.conv.ia3_l.default", "trunk.fc.ia3_l.default"]
    conv, fc = model.trunk.conv, model.trunk.fc
    torch.testing.assert_close(conv(X), conv.base_layer(X) * conv.ia3_l["default"])  # l ⊙ (W x)
    h = torch.randn(4, 2)
    torch.testing.assert_close(fc(h), fc.base_layer(h * fc.ia3_l["default"].view(1, -1)))  # W (l ⊙ x)


def test_bitfit_step_changes_biases_and_heads_only_and_keeps_batchnorm_statistics():
    model = tiny(BitFit())
    assert not model.trunk.bn.training and model.trunk.training
    before = state(model)
    step(model)
    assert changed(before, model) == ["heads.a.fc.bias", "heads.a.fc.weight", "trunk.bn.bias", "trunk.conv.bias", "trunk.fc.bias"]


def test_residual_adapter_starts_as_identity_and_computes_y_plus_w_bn_y():
    model = tiny(ResidualAdapters())
    fresh = tiny(FineTune())
    assert torch.equal(output(model), output(fresh))  # W = 0
    before = state(model)
    step(model)
    moved = changed(before, model)
    # The conv's and fc's weights stay; the adapter's W, both BNs' statistics and the head move
    # (the BNs' γ, β get no gradient through W = 0 at the first step, except the trunk's).
    assert not {"trunk.conv.weight", "trunk.conv.bias", "trunk.fc.weight", "trunk.fc.bias"} & set(moved)
    assert {"trunk.residual_adapters.conv.conv.weight", "trunk.bn.running_mean", "trunk.residual_adapters.conv.norm.running_mean"} <= set(moved)
    model.eval()
    adapter = model.trunk.residual_adapters["conv"]
    y = F.conv2d(X, model.trunk.conv.weight, model.trunk.conv.bias, padding=1)
    torch.testing.assert_close(model.trunk.conv(X), y + F.conv2d(adapter.norm(y), adapter.conv.weight))


# -- bad input: one clear error each, before training ------------------------------------------


def tiny_cfg(recipe):
    return resolve({"output_dir": "unused", "tasks": {"mnist": {}}, "trunk": {"name": "seed_net"}, "recipe": recipe})


@pytest.mark.parametrize(
    "node, message",
    [
        ({"name": "lora", "rank": 0}, r"recipe\.rank must be >= 1"),
        ({"name": "lora", "rank": -2}, r"recipe\.rank must be >= 1"),
        ({"name": "lora", "rank": 2.5}, r"recipe\.rank: expected int, got 2\.5"),
        ({"name": "lora", "alpha": 0}, r"recipe\.alpha must be > 0"),
        ({"name": "lora", "dropout": 1.0}, r"recipe\.dropout must be in \[0, 1\)"),
        ({"name": "lora", "target_modules": "conv("}, r"recipe\.target_modules: 'conv\(' is not a regular expression"),
        ({"name": "ia3", "target_modules": []}, r"recipe\.target_modules must be a regular expression or a list"),
        ({"name": "ia3", "feedforward_modules": 3}, r"recipe\.feedforward_modules must be"),
        ({"name": "residual_adapters", "target_modules": [""]}, r"recipe\.target_modules must be"),
    ],
)
def test_bad_argument_is_a_config_error_naming_the_key(node, message):
    with pytest.raises(ConfigError, match=message):
        build_recipe(tiny_cfg(node))


@pytest.mark.parametrize(
    "recipe, message",
    [
        # fc 2→3 has rank 2; the 3×3 conv 1→2 too (2 × 9).
        (LoRA(rank=3), r"^recipe\.rank: 3 is larger than the rank of 2 targeted layer\(s\): conv \(Conv2d 1→2 3×3: rank at most 2\); fc \(Linear 2→3: rank at most 2\)"),
        (LoRA(target_modules=["conv", "attention"]), r"^recipe\.target_modules: 'attention' names none of the trunk's Linear and ungrouped Conv2d layers\. The trunk's Linear and ungrouped Conv2d layers: conv \(Conv2d 1→2 3×3\); fc \(Linear 2→3\)\.$"),
        (LoRA(target_modules=".*query"), r"^recipe\.target_modules: the regular expression '\.\*query' matches the whole name of none"),
        (IA3(target_modules=["conv"], feedforward_modules=["fc"]), r"^recipe\.feedforward_modules: 'fc' names none of the trunk's targeted layers \(recipe\.target_modules\)\. .*: conv \(Conv2d"),
        (ResidualAdapters(target_modules=["fc"]), r"^recipe\.target_modules: 'fc' names none .* kernels larger than 1×1: conv \(Conv2d 1→2 3×3\)\.$"),
    ],
)
def test_targets_that_match_nothing_or_a_rank_above_the_layer_list_the_trunk_layers(recipe, message):
    with pytest.raises(ConfigError, match=message):
        tiny(recipe)


def test_recipe_without_layers_to_adapt_names_another_recipe():
    mlp = MultiTaskModel(build_trunk({"name": "mlp", "in_features": 4}), {"a": LinearHead((64,), 2)})
    with pytest.raises(ConfigError, match=r"^recipe: residual_adapters adapts Conv2d layers with kernels larger than 1×1, and this trunk \(MLP\) has none; choose another recipe"):
        ResidualAdapters().setup(mlp)


def test_bad_target_stops_the_cli_before_a_run_directory(run_dir, capsys):
    args = ["train", QUICKSTART, *quick(run_dir, 1, 2, "recipe.name=lora", "recipe.target_modules=[conv3]")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "recipe.target_modules: 'conv3' names none" in err and "conv1 (Conv2d 1→10 5×5); conv2 (Conv2d 10→20 5×5); fc (Linear 320→50)" in err
    assert "Traceback" not in err and not run_dir.exists()


@pytest.mark.slow  # a fresh interpreter imports torch: seconds
def test_without_peft_mtl_imports_and_other_recipes_work_and_lora_names_the_extra():
    """In a fresh interpreter where `import peft` fails, as where the extra is not installed."""
    code = """
import sys
sys.modules["peft"] = None  # `import peft` raises ImportError
from mtl.builders import build_recipe
from mtl.config import ConfigError, resolve
cfg = lambda name: resolve({"output_dir": "x", "tasks": {"mnist": {}}, "trunk": {"name": "seed_net"}, "recipe": {"name": name}})
for name in ("fine_tune", "bitfit", "residual_adapters"):
    build_recipe(cfg(name))
for name in ("lora", "ia3"):
    try:
        build_recipe(cfg(name))
    except ConfigError as e:
        print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"recipe: {name!r} needs the peft library, which is not installed; run pip install 'mtl[peft]'." for name in ("lora", "ia3")
    ]


# -- every registered trunk takes lora at its default targets --------------------------------


def registered_trunk(name):
    if name == "minilm":
        return build_trunk({"name": name}), ["a short sentence", "another one"]
    if name == "hf_text":
        return build_trunk({"name": name, "path": str(minilm_path())}), ["a short sentence", "another one"]
    if name not in SPECS:
        pytest.fail(f"trunk {name!r} has no entry in SPECS in tests/test_trunks.py: add kwargs and an input shape")
    kwargs, shape = SPECS[name]
    return build_trunk({"name": name, **kwargs}), torch.randn(2, *shape)


@pytest.mark.parametrize("name", TRUNKS.names())
def test_every_registered_trunk_takes_lora_at_its_default_targets(name):
    torch.manual_seed(0)
    trunk, x = registered_trunk(name)
    if trunk.takes_text:
        from mtl.trunks.text_rows import encode_texts

        x = encode_texts(x)
    targetable = [n for n, m in trunk.named_modules() if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    model = MultiTaskModel(trunk, {})
    model.eval()
    with torch.no_grad():
        before = trunk(x)
    recipe = LoRA(rank=1)
    recipe.setup(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(trunk(x), before)
    adapted = [n.removesuffix(".lora_A.default.weight") for n in recipe.trained if n.endswith("lora_A.default.weight")]
    assert adapted == targetable and targetable


# -- checkpoints of what a recipe trains -------------------------------------------------------


MAKERS = {"lora": lambda: LoRA(rank=2), "ia3": IA3, "bitfit": BitFit, "residual_adapters": ResidualAdapters, "linear_probe": LinearProbe}


@pytest.mark.parametrize("name", MAKERS)
def test_trainable_state_round_trips_through_torch_save_and_weights_only_load(name, tmp_path):
    recipe, make = MAKERS[name](), MAKERS[name]
    model = tiny(recipe)
    start = tiny(make()).state_dict()
    step(model)
    step(model)
    saved = recipe.trainable_state(model)
    keys = set(saved["model"])
    assert keys == set(recipe.state_keys(model)) and set(HEAD) <= keys
    assert changed(start, model) and set(changed(start, model)) <= keys  # everything the steps changed, and only the recipe's keys
    torch.save(saved, tmp_path / "trained.pt")
    loaded = torch.load(tmp_path / "trained.pt", weights_only=True)

    again = make()
    fresh = tiny(again)  # the same base (seed 0), adapters and head at their start
    assert not torch.equal(output(fresh), output(model))
    again.load_trainable_state(fresh, loaded)
    assert torch.equal(output(fresh), output(model))
    assert not changed(model.state_dict(), fresh)


def test_trainable_state_holds_a_fraction_of_the_model_and_names_its_base():
    recipe = LoRA(rank=1)
    model = tiny(recipe)
    buffer, full = io.BytesIO(), io.BytesIO()
    torch.save(recipe.trainable_state(model), buffer)
    torch.save(model.state_dict(), full)
    assert len(buffer.getvalue()) < len(full.getvalue())
    base = recipe.trainable_state(model)["base"]
    assert base["trunk"].endswith("test_peft_recipes.Tiny") and base["weights"] is None and len(base["sha256"]) == 64


def test_loading_trained_parameters_onto_another_base_or_recipe_is_refused():
    recipe = LoRA(rank=2)
    saved = recipe.trainable_state(tiny(recipe))
    other = LoRA(rank=2)
    with pytest.raises(ConfigError, match=r"^checkpoint: trained on another base trunk .*sha256 [0-9a-f]{12}\) than this one"):
        other.load_trainable_state(tiny(other, seed=1), saved)
    lower = LoRA(rank=1)
    with pytest.raises(ConfigError, match=r"^checkpoint: shapes differ from this model's: trunk\.conv\.lora_A\.default\.weight \(2, 1, 3, 3\) \(here \(1, 1, 3, 3\)\)"):
        lower.load_trainable_state(tiny(lower), saved)
    with pytest.raises(ConfigError, match=r"^checkpoint: its keys are not the ones this recipe trains \(missing: none; unexpected: trunk\.extra\)"):
        other.load_trainable_state(tiny(other), {**saved, "model": {**saved["model"], "trunk.extra": torch.zeros(1)}})
    ia3 = IA3()
    with pytest.raises(ConfigError, match=r"^checkpoint: written by recipe LoRA, not IA3"):
        ia3.load_trainable_state(tiny(ia3), saved)


@pytest.mark.slow
def test_lora_run_resumes_exactly(tmp_path):
    """A resumed run sets its adapters up before reading the checkpoint, whose keys hold them."""
    args = ["recipe.name=lora", "recipe.rank=2", "trainer.batch_size=16", "trainer.lr_schedule.name=constant", "trainer.lr_schedule.warmup_steps=0"]
    assert main(["train", QUICKSTART, *quick(tmp_path / "full", 2, 2, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 1, 2, *args)]) == 0
    assert main(["train", QUICKSTART, *quick(tmp_path / "part", 2, 2, *args, "resume=true")]) == 0
    full, part = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("full", "part"))
    assert part["steps"] == full["steps"] == 4 and part["splits"] == full["splits"]


@pytest.mark.slow
def test_a_lora_run_writes_its_trained_parameters_alone_and_they_rebuild_the_selected_model(tmp_path):
    from mtl import checkpoint
    from mtl.builders import build_run
    from mtl.config import load_config
    from mtl.distributed import Context

    run = tmp_path / "lora"
    assert main(["train", QUICKSTART, *quick(run, 1, 2, "recipe.name=lora", "recipe.rank=2", "trainer.batch_size=16")]) == 0
    trained, best = checkpoint.load(run / "trained.pt"), checkpoint.load(run / "checkpoints" / "best.pt")
    assert trained["recipe_config"]["name"] == "lora" and (run / "trained.pt").stat().st_size < (run / "checkpoints" / "best.pt").stat().st_size
    fresh = build_run(load_config(run / "config.yaml"), Context(), torch.device("cpu"))
    fresh.recipe.load_trainable_state(fresh.model, trained)
    assert all(torch.equal(v, best["model"][k]) for k, v in fresh.model.state_dict().items())


def test_a_fine_tune_run_writes_no_trained_parameters_file(tmp_path):
    assert main(["train", QUICKSTART, *quick(tmp_path / "ft", 1, 1, "trainer.batch_size=16")]) == 0
    assert not (tmp_path / "ft" / "trained.pt").exists() and (tmp_path / "ft" / "trunk.pt").exists()


# -- one comparison cell end to end ------------------------------------------------------------


@pytest.mark.slow
def test_compare_sequential_lora_cell_reports_its_trainable_parameters(tmp_path):
    out = tmp_path / "cmp"
    args = [
        f"output_dir={out}", "trainer.epochs=1", "trainer.steps_per_epoch=2", "trainer.batch_size=16", "logging.wandb.mode=disabled",
        "compare.seeds=[0]", "compare.fractions=[1.0]", "compare.regimes={sequential: {recipes: [{name: lora, rank: 2}]}}",
        *(f"tasks.{t}.{k}=0.05" for t in ("mnist", "digits") for k in ("train_fraction", "val_fraction", "test_fraction")),
    ]
    assert main(["compare", QUICKSTART, *args]) == 0
    df = pd.read_csv(out / "results.csv")
    target = df[(df.method == "sequential/lora") & (df.task == "digits")]
    # seed_net at rank 2: conv1 (25 + 10)·2, conv2 (250 + 20)·2, fc (320 + 50)·2 = 1350; digits head 510.
    assert not target.empty and set(target.trainable_params) == {1350 + 510}


def test_recipe_bench_counts_what_each_recipe_trains_and_stores(tmp_path):
    from mtl.bench.recipes import main as bench

    rows = bench(["--recipes", "fine_tune", "{name: lora, rank: 2}", "--rounds", "1", "--warmup", "0", "--batch", "4", "--out", str(tmp_path / "rows.json")])
    full, lora = rows
    assert full["trainable"] == full["total"] == 21_330 + 510  # seed_net and one 50→10 head
    assert lora["trainable"] == 1350 + 510 and lora["total"] == full["total"] + 1350
    assert lora["checkpoint_bytes"] < full["checkpoint_bytes"] <= full["model_bytes"]
    assert full["step_vs_fine_tune"] == 1.0 and lora["step_ms"] > 0


def test_the_papers_targets_on_minilm_train_what_the_papers_count():
    """LoRA on W_q, W_v (Hu et al.'s experiments) and (IA)³'s l_k, l_v, l_ff (Liu et al.), as the
    recipes' docstrings spell them for minilm: 6 layers of width 384, feed-forward 1536."""
    lora = LoRA(rank=8, target_modules=r".*\.(query|value)")
    model = MultiTaskModel(build_trunk({"name": "minilm"}), {})
    lora.setup(model)
    assert sum(model.trunk.get_parameter(n).numel() for n in lora.trained) == 6 * 2 * (384 * 8 + 8 * 384)
    ia3 = IA3(target_modules=r".*\.(key|value)|.*\.[0-9]+\.output\.dense", feedforward_modules=r".*\.[0-9]+\.output\.dense")
    model = MultiTaskModel(build_trunk({"name": "minilm"}), {})
    ia3.setup(model)
    sizes = {n.split(".", 4)[4]: model.trunk.get_parameter(n).numel() for n in ia3.trained if n.startswith("model.encoder.layer.0.")}
    assert sizes == {"attention.self.key.ia3_l.default": 384, "attention.self.value.ia3_l.default": 384, "output.dense.ia3_l.default": 1536}
    assert len(ia3.trained) == 6 * 3
