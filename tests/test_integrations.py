"""Where users train: Hugging Face Trainer, TRL's SFTTrainer, accelerate and PEFT LoRA under
offload give the losses and the logged grad_norm of plain training, with clipping
(max_grad_norm=1.0), gradient accumulation and gradient checkpointing.

All in fp32 (bf16=False): bf16 runs differ from plain by more than 1e-5 because the host
kernel rounds the bf16 params once where torch rounds in a different order (1 bit).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from allocators.errors import OffloadError
from offload.integrations import enable_with_accelerator, offload_trainer
from offload.integrations.unwrap import inner_optimizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

BUDGETS = {"dram": "1GiB"}
STEPS = 8


def tiny_llama(seed: int = 0) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return tf.LlamaForCausalLM(config)


def token_rows(count: int, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (count, seq), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_args(tmp_path, **overrides) -> tf.TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        max_steps=STEPS,
        learning_rate=3e-3,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return tf.TrainingArguments(**settings)


def logged(trainer) -> tuple[list[float], list[float]]:
    steps = [row for row in trainer.state.log_history if "loss" in row]
    return [row["loss"] for row in steps], [row["grad_norm"] for row in steps]


def train_trainer(tmp_path, make_model=tiny_llama, offloaded=False, **overrides):
    args = training_args(tmp_path, **overrides)
    trainer = tf.Trainer(model=make_model(), args=args, train_dataset=token_rows(64))
    callback = offload_trainer(trainer, budgets=BUDGETS) if offloaded else None
    trainer.train()
    return trainer, callback


def assert_same_training(plain, offloaded) -> None:
    losses, norms = logged(plain)
    off_losses, off_norms = logged(offloaded)
    assert len(losses) == STEPS
    # Clipping did something: a norm of 0 (what reading empty device grads gives) fails here.
    assert max(norms) > 1.0
    assert off_losses == pytest.approx(losses, abs=1e-5)
    assert off_norms == pytest.approx(norms, abs=1e-5, rel=1e-5)


@pytest.mark.parametrize(
    "accumulation, checkpointing", [(1, False), (2, False), (1, True), (2, True)]
)
def test_trainer_with_max_grad_norm_matches_plain(tmp_path, accumulation, checkpointing):
    overrides = dict(gradient_accumulation_steps=accumulation, gradient_checkpointing=checkpointing)
    plain, _ = train_trainer(tmp_path, **overrides)
    offloaded, callback = train_trainer(tmp_path, offloaded=True, **overrides)
    assert_same_training(plain, offloaded)
    sess = callback.session
    assert sess.config.grad_accumulation_steps == accumulation
    assert len(sess.report()) == STEPS
    assert not sess.enabled  # disabled at train end, the optimizer plain again
    assert "step" not in vars(offloaded.optimizer.optimizer)


def test_trainer_logs_carry_the_offload_report_columns(tmp_path):
    trainer, callback = train_trainer(tmp_path, offloaded=True, max_steps=2)
    steps = [row for row in trainer.state.log_history if "loss" in row]
    report = callback.session.report()
    assert steps[-1]["offload/optimizer_ms"] == pytest.approx(report["optimizer_ms"].iloc[-1])
    assert "offload/host_dram_nbytes" in steps[-1]


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(126)} | {"<pad>": 126, "<eos>": 127}
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>",
        eos_token="<eos>",
    )


def train_sft(tmp_path, offloaded: bool, **overrides):
    import datasets
    from trl import SFTConfig, SFTTrainer

    rows = token_rows(64)
    dataset = datasets.Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows]})
    settings = vars(training_args(tmp_path)).copy()
    shared = (
        "output_dir", "use_cpu", "bf16", "max_steps", "seed", "per_device_train_batch_size",
        "learning_rate", "max_grad_norm", "logging_steps", "report_to", "save_strategy",
        "disable_tqdm",
    )  # fmt: skip
    config = SFTConfig(
        **{k: settings[k] for k in shared},
        max_length=16,
        **overrides,
    )
    trainer = SFTTrainer(
        model=tiny_llama(), args=config, train_dataset=dataset, processing_class=tiny_tokenizer()
    )
    if offloaded:
        offload_trainer(trainer, budgets=BUDGETS)
    trainer.train()
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trl_sft_trainer_matches_plain(tmp_path, accumulation):
    # TRL turns gradient checkpointing on by default: it runs here too.
    plain = train_sft(tmp_path, offloaded=False, gradient_accumulation_steps=accumulation)
    offloaded = train_sft(tmp_path, offloaded=True, gradient_accumulation_steps=accumulation)
    assert plain.args.gradient_checkpointing
    assert_same_training(plain, offloaded)


def lora_llama() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    torch.manual_seed(2)
    # Random B as well as A (not zeros), so the adapters' grads are large enough to clip.
    config = LoraConfig(
        r=4,
        lora_alpha=128,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    return get_peft_model(model, config)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_peft_lora_under_trainer_matches_plain(tmp_path, accumulation):
    overrides = dict(gradient_accumulation_steps=accumulation)
    plain, _ = train_trainer(tmp_path, make_model=lora_llama, **overrides)
    offloaded, callback = train_trainer(
        tmp_path, make_model=lora_llama, offloaded=True, **overrides
    )
    assert_same_training(plain, offloaded)
    # Only the adapters are trained, so only they have host masters and state.
    trainable = [p for p in offloaded.model.parameters() if p.requires_grad]
    assert len(callback.session.report()) == STEPS
    assert {id(p) for p in trainable} == {
        id(p) for g in offloaded.optimizer.param_groups for p in g["params"]
    }


def accelerate_loop(order: str, accumulation: int) -> tuple[list[float], list[float]]:
    """A loop as accelerate's docs write it, plain ("plain"), or offloaded with enable() before
    ("enable_first") or after ("prepare_first") accelerator.prepare."""
    from accelerate import Accelerator

    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    loader = torch.utils.data.DataLoader(token_rows(2 * STEPS * accumulation), batch_size=2)
    sess = None
    if order == "enable_first":
        sess = enable_with_accelerator(accelerator, model, optimizer, budgets=BUDGETS)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if order == "prepare_first":
        sess = enable_with_accelerator(accelerator, model, optimizer, budgets=BUDGETS)
    losses, norms = [], []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 1.0)))
            optimizer.step()
            optimizer.zero_grad()
        losses.append(float(loss))
    if sess is not None:
        assert len(sess.report()) == STEPS
        sess.disable()
    return losses, norms


@pytest.mark.parametrize("order", ["enable_first", "prepare_first"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_accelerate_loop_matches_plain_in_either_order(order, accumulation):
    losses, norms = accelerate_loop("plain", accumulation)
    off_losses, off_norms = accelerate_loop(order, accumulation)
    assert len(norms) == STEPS and max(norms) > 1.0
    assert off_losses == pytest.approx(losses, abs=1e-5)
    assert off_norms == pytest.approx(norms, abs=1e-5, rel=1e-5)


def test_enable_accepts_a_wrapped_optimizer_and_patches_the_inner_one():
    import offload

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            self.optimizer.step()

    model = torch.nn.Linear(4, 2)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    with offload.enable(model, Wrapper(inner), budgets=BUDGETS) as sess:
        assert sess.optimizer is inner
        model(torch.ones(3, 4)).sum().backward()
        assert model.weight.grad is None  # the gradient went to the host
        Wrapper(inner).step()
        assert len(sess.report()) == 1


def test_a_loss_scaler_around_the_optimizer_is_refused_with_what_to_use():
    class ScaledWrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.scaler = torch.amp.GradScaler("cpu")

    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(OffloadError, match="bf16"):
        inner_optimizer(ScaledWrapper(opt))


def test_deepspeed_style_clip_on_the_optimizer_returns_the_true_norm():
    import offload

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(16, 8)
    reference(x).pow(2).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with offload.enable(model, opt, budgets=BUDGETS):
        model(x).pow(2).sum().backward()
        norm = opt.clip_grad_norm(1.0)
        opt.step()
    assert float(norm) == pytest.approx(float(expected), rel=1e-6) and float(norm) > 1.0
    assert not hasattr(opt, "clip_grad_norm")  # gone with the session


def test_clip_grad_value_clamps_the_host_gradients_as_plain_does():
    import offload

    def run(offloaded: bool) -> list[float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sess = offload.enable(model, opt, budgets=BUDGETS) if offloaded else None
        gen = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(4):
            loss = model(torch.randn(16, 8, generator=gen)).pow(2).mean() * 100
            loss.backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        if sess is not None:
            sess.disable()
        return losses

    plain = run(False)
    assert run(True) == pytest.approx(plain, abs=1e-5)
    assert len(set(plain)) > 1


def test_accelerate_imported_after_enable_is_routed_from_the_next_forward():
    import sys

    import accelerate.accelerator as accelerator_module

    import offload

    original = accelerator_module.Accelerator.clip_grad_norm_
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    saved = sys.modules.pop("accelerate.accelerator")
    try:
        with offload.enable(model, opt, budgets=BUDGETS):
            assert accelerator_module.Accelerator.clip_grad_norm_ is original
            sys.modules["accelerate.accelerator"] = saved  # the script imports it now
            model(torch.ones(1, 4))
            assert accelerator_module.Accelerator.clip_grad_norm_ is not original
    finally:
        sys.modules["accelerate.accelerator"] = saved
    assert accelerator_module.Accelerator.clip_grad_norm_ is original
