"""dtp_ext.lightning.FeedbackCallback in a real lightning.Trainer on the CPU: the same weights as
the README's plain loop (float32, bf16-mixed, 16-mixed with its GradScaler, gradient
accumulation, gradient clipping, manual optimisation), a checkpoint resumed bitwise, DDP on 2
processes, and the optional import."""

import os
import subprocess
import sys
from types import SimpleNamespace

import lightning as L  # the test extra installs it: a missing one fails here, never skips
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

import dtp_ext
from dtp_ext.lightning import FeedbackCallback

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*bfloat16 feedback loops:RuntimeWarning"),
]

FEEDBACK = {"iterations": 4, "noise_std": 0.1, "lr": 0.05}
BATCHES, BATCH = 3, 8


class Lit(L.LightningModule):
    """Three blocks with tanh inside the blocks (the target step is nonlinear in the gradient,
    so a loss scale not divided out changes the updates' direction)."""

    def __init__(self, manual: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            dtp_ext.Linear(6, 8, activation="tanh"),
            dtp_ext.Linear(8, 8, activation="tanh"),
            dtp_ext.Linear(8, 4),
        )
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data(seed=1):
    """BATCHES batches of BATCH samples, in order (the DataLoader draws one number from torch's
    generator per epoch, in the plain loop as in Lightning)."""
    g = torch.Generator().manual_seed(seed)
    x, y = (
        torch.randn(BATCHES * BATCH, 6, generator=g),
        torch.randint(0, 4, (BATCHES * BATCH,), generator=g),
    )
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_equal(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} differs"


def fit(
    tmp_path, epochs=2, seed=0, callback=None, ckpt_path=None, module=Lit, also=(), **trainer_kwargs
):
    torch.manual_seed(seed)
    module = module()  # after the seed
    callback = callback if callback is not None else FeedbackCallback(**FEEDBACK)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[callback, *also],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=bool(also),
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return module, callback, trainer


def plain(epochs=2, seed=0, precision=None, accumulate=1, clip=None, scale=True):
    """The README's loop: model(x); trainer.step(); backward (inside loss_scale); opt.step()."""
    torch.manual_seed(seed)
    module = Lit()
    trainer = dtp_ext.FeedbackTrainer(module, **FEEDBACK)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu") if precision == torch.float16 else None
    feedback_steps, loader = 0, data()
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader):
            with torch.autocast(
                "cpu", dtype=precision, enabled=precision is not None, cache_enabled=False
            ):
                loss = F.cross_entropy(module.net(x), y)
            if i % accumulate == 0:  # one feedback phase per optimizer step
                trainer.step()
                feedback_steps += 1
            if i % accumulate == 0:
                opt.zero_grad()
            k = (1 / accumulate) * (scaler.get_scale() if scaler else 1.0)
            with dtp_ext.loss_scale(k if scale else 1.0):
                loss = loss / accumulate
                (scaler.scale(loss) if scaler else loss).backward()
            if (i + 1) % accumulate and i + 1 < BATCHES:
                continue
            if scaler:
                scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
    return state(module), feedback_steps


def test_matches_the_plain_loop(tmp_path):
    module, callback, trainer = fit(tmp_path)
    expected, feedback_steps = plain()
    assert_equal(state(module), expected)
    assert trainer.global_step == 2 * BATCHES
    assert callback.feedback_trainer.steps == trainer.global_step == feedback_steps
    assert set(callback.last_report.losses) == {"net.1", "net.2"}  # net.0 is fed by the data
    torch.manual_seed(0)
    initial = state(Lit())
    for name in ("net.1", "net.2"):
        assert not torch.equal(
            expected[f"{name}.feedback_weight"], initial[f"{name}.feedback_weight"]
        )


def test_bf16_mixed(tmp_path):
    module, callback, _ = fit(tmp_path, precision="bf16-mixed")
    assert module.net[2].recorded_input.dtype == torch.bfloat16
    assert module.net[2].feedback_weight.dtype == torch.float32  # float32 masters
    expected, _ = plain(precision=torch.bfloat16)
    assert_equal(state(module), expected)
    fp32, _ = plain()
    assert not torch.equal(expected["net.1.feedback_weight"], fp32["net.1.feedback_weight"])


def test_16_mixed_gradscaler_scale_reaches_the_blocks(tmp_path):
    # Lightning turns precision="16-mixed" on the CPU into bf16-mixed; the plugin keeps float16
    # and its GradScaler.
    plugin = MixedPrecision("16-mixed", "cpu")
    module, _, trainer = fit(tmp_path, plugins=[plugin])
    assert trainer.precision_plugin is plugin and plugin.scaler.get_scale() >= 2.0**15
    assert module.net[2].recorded_input.dtype == torch.float16
    expected, _ = plain(precision=torch.float16)
    assert_equal(state(module), expected)
    # Without the scale reaching the blocks the run ends elsewhere: the comparison can fail.
    unscaled, _ = plain(precision=torch.float16, scale=False)
    assert not torch.equal(unscaled["net.0.weight"], expected["net.0.weight"])


def test_accumulation_runs_the_feedback_phase_once_per_optimizer_step(tmp_path):
    module, callback, trainer = fit(tmp_path, accumulate_grad_batches=2)
    # 3 micro-batches per epoch: steps after the 2nd and after the epoch's last.
    assert trainer.global_step == 4
    assert callback.feedback_trainer.steps == trainer.global_step
    expected, feedback_steps = plain(accumulate=2)
    assert feedback_steps == trainer.global_step
    assert_equal(state(module), expected)
    # Lightning divides the loss by 2: without loss_scale(1/2) the updates differ.
    unscaled, _ = plain(accumulate=2, scale=False)
    assert not torch.equal(unscaled["net.0.weight"], expected["net.0.weight"])


def test_gradient_clipping(tmp_path):
    module, _, _ = fit(tmp_path, gradient_clip_val=0.05)
    expected, _ = plain(clip=0.05)
    assert_equal(state(module), expected)
    unclipped, _ = plain()
    assert not torch.equal(unclipped["net.0.weight"], expected["net.0.weight"])


def test_16_mixed_with_accumulation_and_clipping(tmp_path):
    module, _, _ = fit(
        tmp_path,
        plugins=[MixedPrecision("16-mixed", "cpu")],
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
    )
    expected, _ = plain(precision=torch.float16, accumulate=2, clip=0.05)
    assert_equal(state(module), expected)


def test_manual_optimisation_runs_once_per_manual_backward(tmp_path):
    module, callback, trainer = fit(tmp_path, module=lambda: Lit(manual=True))
    assert callback.feedback_trainer.steps == 2 * BATCHES
    expected, _ = plain()
    assert_equal(state(module), expected)


@pytest.mark.parametrize("restore_rng", [True, False])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, restore_rng):
    # 4 epochs straight, a checkpoint at each epoch's end; resume from the 2nd epoch's.
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    straight, _, _ = fit(tmp_path, epochs=4, also=[every_epoch])
    path = tmp_path / "ckpt" / f"epoch=1-step={2 * BATCHES}.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"]["FeedbackCallback"]
    assert saved["feedback_trainer"]["steps"] == 2 * BATCHES and len(saved["rng"]) == 1
    # Another seed: another initial model and generator state, which the checkpoint replaces.
    callback = FeedbackCallback(restore_rng=restore_rng, **FEEDBACK)
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    resumed, callback, trainer = fit(
        tmp_path, epochs=4, seed=123, callback=callback, ckpt_path=path, also=[again]
    )
    assert trainer.global_step == 4 * BATCHES
    assert callback.feedback_trainer.steps == 4 * BATCHES
    if restore_rng:
        assert_equal(state(resumed), state(straight))  # bitwise
    else:  # the feedback noise after the resume is another draw
        assert not torch.equal(
            state(resumed)["net.1.feedback_weight"], state(straight)["net.1.feedback_weight"]
        )


def test_resume_restores_the_momentum(tmp_path):
    _, _, first = fit(tmp_path, epochs=1)
    path = tmp_path / "one.ckpt"
    first.save_checkpoint(path)
    momentum = torch.load(path, weights_only=False)["callbacks"]["FeedbackCallback"][
        "feedback_trainer"
    ]["momentum_buffers"]
    callback = FeedbackCallback(**FEEDBACK)
    fit(tmp_path, epochs=1, callback=callback, ckpt_path=path)  # nothing left to train
    for name, buffers in momentum.items():
        assert buffers["weight"].abs().sum() > 0
        assert torch.equal(
            callback.feedback_trainer._momentum_buffers[name]["weight"], buffers["weight"]
        )


# Resuming a backprop run: its forward weights moved before any feedback training.
@pytest.mark.filterwarnings("ignore:FeedbackTrainer. the forward weights:RuntimeWarning")
def test_checkpoint_without_callback_state_warns(tmp_path):
    torch.manual_seed(0)
    module = Lit()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, data())
    path = tmp_path / "backprop.ckpt"
    trainer.save_checkpoint(path)
    with pytest.warns(RuntimeWarning, match="holds no FeedbackCallback state"):
        fit(tmp_path, epochs=2, ckpt_path=path)


def test_bad_arguments():
    with pytest.raises(TypeError, match="iteratons is not a FeedbackTrainer argument"):
        FeedbackCallback(iteratons=3)
    with pytest.raises(ValueError, match="restore_rng must be True or False"):
        FeedbackCallback(restore_rng="yes")
    callback = FeedbackCallback()
    with pytest.raises(ValueError, match="strategy object is not supported"):
        callback.setup(SimpleNamespace(callbacks=[callback], strategy=object()), Lit(), "fit")
    with pytest.raises(ValueError, match="more than one FeedbackCallback"):
        callback.setup(SimpleNamespace(callbacks=[callback, FeedbackCallback()]), Lit(), "fit")
    with pytest.raises(ValueError, match="state_dict must come from"):
        callback.load_state_dict({"momentum_buffers": {}})


def test_bad_feedback_settings_fail_at_fit(tmp_path):
    with pytest.raises(ValueError, match="momentum must be in"):
        fit(tmp_path, callback=FeedbackCallback(momentum=1.5))


# -- DDP: 2 processes on gloo --------------------------------------------------------------------
class DDPLit(Lit):
    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = out_dir

    def on_train_end(self):
        torch.save(state(self), os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))
        callback = next(c for c in self.trainer.callbacks if isinstance(c, FeedbackCallback))
        torch.save(
            {"steps": callback.feedback_trainer.steps, "world": torch.distributed.get_world_size()},
            os.path.join(self.out_dir, f"feedback{self.global_rank}.pt"),
        )
        self.trainer.save_checkpoint(os.path.join(self.out_dir, "ddp.ckpt"))  # on every rank


@pytest.mark.integration
def test_ddp_two_processes(tmp_path):
    torch.manual_seed(0)
    module = DDPLit(str(tmp_path))
    initial = state(module)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 4, (32,))), batch_size=8
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        callbacks=[FeedbackCallback(**FEEDBACK)],  # sync="gradients", the default under DDP
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Each rank trained its feedback on its own shard after the last forward pass (where DDP
    # broadcast rank 0's buffers): equal only through the trainer's sync.
    assert_equal(ranks[1], ranks[0])
    for name in ("net.1", "net.2"):
        assert not torch.equal(
            ranks[0][f"{name}.feedback_weight"], initial[f"{name}.feedback_weight"]
        )
    # 32 samples, batch 8, 2 ranks: 2 optimizer steps, one feedback phase before each.
    for r in range(2):
        assert torch.load(tmp_path / f"feedback{r}.pt") == {"steps": 2, "world": 2}
    saved = torch.load(tmp_path / "ddp.ckpt", weights_only=False)["callbacks"]["FeedbackCallback"]
    assert len(saved["rng"]) == 2 and saved["feedback_trainer"]["steps"] == 2


# -- optional dependency -------------------------------------------------------------------------
@pytest.mark.integration
def test_dtp_ext_imports_without_lightning():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"  # as if it were not installed
        "import dtp_ext\n"
        "try:\n"
        "    import dtp_ext.lightning\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('dtp_ext.lightning imported without lightning')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pip install lightning" in done.stdout


class SharedLit(L.LightningModule):
    """training_step reaches the blocks through a submodule and uses one block twice."""

    def __init__(self):
        super().__init__()
        self.stem = dtp_ext.Linear(6, 8, activation="tanh")
        self.shared = dtp_ext.Linear(8, 8, activation="tanh")
        self.head = dtp_ext.Linear(8, 4)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.shared(self.shared(self.stem(x)))), y)
        return loss

    def on_before_backward(self, loss):
        self.seen.append(tuple(self.shared.recorded_input.shape))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_training_step_is_one_forward_pass(tmp_path):
    """However training_step reaches the blocks (here not through self(x)), it is one forward
    pass: a block it calls twice trains on both inputs."""
    module, callback, _ = fit(tmp_path, epochs=1, module=SharedLit)
    assert module.seen == [(2 * BATCH, 8)] * BATCHES
    assert set(callback.last_report.losses) == {"shared", "head"}
