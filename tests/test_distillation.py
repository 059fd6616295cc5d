"""Distillation: kd_loss, shrink (DistilBERT's student) and the Distillation callback."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from lightning_peft import (
    AdapterCheckpoint,
    AdapterConfigError,
    AdapterStateError,
    Distillation,
    PeftCallback,
    adapter_state_dict,
)
from lightning_peft.distillation import kd_loss, layer_stacks, shrink
from tests.lightning_modules import QV_LORA, CausalLM, fit, token_data
from tests.snapshots import refused_without_a_trace
from tests.tiny_models import VOCAB, tiny_llama

# ---------------------------------------------------------------------------- kd_loss


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kd_loss_is_t_squared_kl_averaged_over_examples(temperature):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=generator)
    expected = 0.0
    for s, t in zip(student, teacher, strict=True):
        p = torch.softmax(t / temperature, -1)
        q = torch.softmax(s / temperature, -1)
        expected += (p * (p.log() - q.log())).sum()
    expected = temperature**2 * expected / 5
    assert torch.allclose(kd_loss(student, teacher, temperature), expected, atol=1e-6)


def test_kd_loss_averages_over_unmasked_tokens_only():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 2, 4, 11, generator=generator)  # (B=2, T=4, V=11) each
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kept = mask.bool()
    expected = kd_loss(student[kept], teacher[kept], 2.0)  # the 5 unmasked positions alone
    assert torch.allclose(kd_loss(student, teacher, 2.0, mask), expected, atol=1e-6)
    student[~kept] += 100  # masked positions change nothing
    assert torch.allclose(kd_loss(student, teacher, 2.0, mask), expected, atol=1e-6)


def test_kd_loss_is_zero_for_equal_logits_and_keeps_its_gradient_scale_across_temperatures():
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(64, 10, generator=generator)
    assert kd_loss(teacher.clone(), teacher, 3.0).abs() < 1e-6
    norms = []
    for temperature in (8.0, 16.0):
        student = torch.randn(64, 10, generator=torch.Generator().manual_seed(3))
        student.requires_grad_(True)
        kd_loss(student, teacher, temperature).backward()
        norms.append(student.grad.norm().item())
    # Hinton et al.: the T² factor makes the gradient ~ (z_s - z_t) / (N·C), whatever T
    assert 0.9 < norms[0] / norms[1] < 1.1


def test_kd_loss_ignores_classes_the_teacher_rules_out():
    teacher = torch.tensor([[2.0, -float("inf"), 0.5]])
    student = torch.tensor([[1.0, 3.0, 0.0]])
    p = torch.softmax(teacher, -1)[0, [0, 2]]
    q = torch.softmax(student, -1)[0, [0, 2]]
    assert torch.allclose(kd_loss(student, teacher, 1.0), (p * (p.log() - q.log())).sum())


def test_kd_loss_refuses_other_vocabularies_and_bad_temperatures():
    with pytest.raises(
        AdapterConfigError, match=r"student logits \(2, 5\) and teacher logits \(2, 6\) differ"
    ):
        kd_loss(torch.zeros(2, 5), torch.zeros(2, 6))
    for bad in (0, float("inf"), True):
        with pytest.raises(AdapterConfigError, match="temperature must be a positive finite"):
            kd_loss(torch.zeros(2, 5), torch.zeros(2, 5), temperature=bad)


# ----------------------------------------------------------------------------- shrink


def four_layers(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB)
    if family == "llama":
        return tiny_llama(num_hidden_layers=4)
    if family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=64)
        return GPT2LMHeadModel(config).eval()
    if family == "bert":
        return BertForSequenceClassification(BertConfig(**small, num_hidden_layers=4)).eval()
    if family == "roberta":
        config = RobertaConfig(**small, num_hidden_layers=4, pad_token_id=1)
        return RobertaForSequenceClassification(config).eval()
    if family == "bart":
        config = BartConfig(
            d_model=64,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        )
        return BartForConditionalGeneration(config).eval()
    if family == "whisper":
        config = WhisperConfig(
            d_model=64,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            vocab_size=VOCAB,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
        return WhisperForConditionalGeneration(config).eval()
    config = T5Config(
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=4,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def run(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, WhisperForConditionalGeneration):  # audio features in
            features = torch.randn(ids.shape[0], 8, 32, generator=torch.Generator().manual_seed(1))
            return model(input_features=features, decoder_input_ids=ids[:, :5]).logits
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "roberta", "t5", "bart", "whisper"])
def test_shrink_keeps_every_other_layer_identical_and_saves(family, tmp_path):
    teacher = four_layers(family)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = shrink(teacher)
    stacks, sources = layer_stacks(student), layer_stacks(teacher)
    encoder_decoder = family in ("t5", "bart", "whisper")
    assert stacks.keys() == sources.keys() and len(stacks) == (2 if encoder_decoder else 1)
    for name, stack in stacks.items():
        assert len(stack) == 2
        for index, source in zip((0, 1), (0, 2), strict=True):
            ours, theirs = stack[index].state_dict(), sources[name][source].state_dict()
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert student.config.num_hidden_layers == 2
    if family == "t5":
        assert (student.config.num_layers, student.config.num_decoder_layers) == (2, 2)
    if family in ("bart", "whisper"):  # the decoder's depth too, or it reloads 4 random layers
        assert (student.config.encoder_layers, student.config.decoder_layers) == (2, 2)
    # the teacher is untouched; the student saves and loads as an ordinary model
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert teacher.config.num_hidden_layers == 4
    student.save_pretrained(tmp_path)
    loaded = type(student).from_pretrained(tmp_path).eval()
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(loaded, ids), run(student, ids))
    assert not torch.allclose(run(student, ids), run(teacher, ids))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_shrunk_decoder_generates_with_its_cache(family):
    student = shrink(four_layers(family), keep=[1, 3])
    ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    out = student.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # the cache (indexed by layer) gives what recomputing the whole sequence gives
    full = ids
    for _ in range(4):
        full = torch.cat([full, run(student, full)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, full)


def test_shrink_refuses_bad_keeps_and_models_without_layers():
    model = four_layers("llama")
    with pytest.raises(
        AdapterConfigError,
        match=r"distinct layer indices in \[0, 4\) for model.layers, got \[0, 4\]",
    ):
        shrink(model, keep=[0, 4])
    with pytest.raises(AdapterConfigError, match=r"got \[1, 1\]"):
        shrink(model, keep=[1, 1])
    with pytest.raises(AdapterConfigError, match="keep must be 'every-other'"):
        shrink(model, keep="every-third")
    with pytest.raises(AdapterConfigError, match="layer 0 holds the relative position bias"):
        shrink(four_layers("t5"), keep=[1, 3])
    with pytest.raises(AdapterConfigError, match="finds no layer stack in Linear"):
        shrink(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------- the callback


def teacher_model() -> LlamaForCausalLM:
    return tiny_llama(seed=5)  # another model of the student's architecture


def held_out_kl(student: torch.nn.Module, teacher: torch.nn.Module) -> float:
    ids = token_data(8).dataset
    ids = torch.stack(list(ids))
    with torch.no_grad():
        return kd_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0).item()


def test_the_callback_pulls_a_student_that_knows_nothing_of_it_toward_the_teacher(tmp_path):
    module = CausalLM()
    module.model.eval()  # the mechanism does not depend on train mode
    teacher = teacher_model()
    before = held_out_kl(module.model, teacher)
    distill = Distillation(teacher, temperature=2.0, alpha=1.0)
    fit(module, tmp_path, 20, [distill], data=token_data(48))
    after = held_out_kl(module.model, teacher)
    assert after < 0.7 * before, (before, after)
    hard_labels_only = CausalLM()  # the same steps on the labels alone move away from it
    fit(hard_labels_only, tmp_path / "hard", 20, [], data=token_data(48))
    assert held_out_kl(hard_labels_only.model, teacher) > before > after
    assert distill.last_kd is not None and distill.teacher_logits.shape[-1] == VOCAB
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert "training_step" not in module.__dict__  # the module is as it was after fit


def test_alpha_none_leaves_the_loss_and_provides_the_teacher_logits(tmp_path):
    module = CausalLM()
    straight = fit(CausalLM(), tmp_path / "a", 3, [])
    distill = Distillation(teacher_model(), alpha=None)
    run_ = fit(module, tmp_path / "b", 3, [distill])
    assert run_.losses == straight.losses  # the module's own loss, untouched
    assert distill.teacher_logits is not None


def test_teacher_stays_out_of_checkpoint_and_optimizer_and_resume_is_exact(tmp_path):
    teacher = teacher_model()

    def callbacks():
        return [PeftCallback(QV_LORA), Distillation(teacher, alpha=0.5)]

    straight = CausalLM()
    reference = fit(straight, tmp_path / "a", 6, callbacks())
    first = CausalLM()
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    run_ = fit(first, tmp_path / "b", 3, [*callbacks(), saver])
    optimizer_params = {
        id(p) for group in run_.trainer.optimizers[0].param_groups for p in group["params"]
    }
    assert not optimizer_params & {id(p) for p in teacher.parameters()}
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(adapter_state_dict(first))
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("Distillation")]
    assert set(state) == {"teacher_fingerprint"} and len(state["teacher_fingerprint"]) == 64

    resumed = CausalLM()
    second = fit(resumed, tmp_path / "c", 6, callbacks(), ckpt_path=str(ckpt))
    assert second.losses == reference.losses[3:]
    final, expected = adapter_state_dict(resumed), adapter_state_dict(straight)
    assert all(torch.equal(final[k], expected[k]) for k in final)

    other = [PeftCallback(QV_LORA), Distillation(tiny_llama(seed=6), alpha=0.5)]
    with pytest.raises(AdapterStateError, match="trained with another teacher"):
        fit(CausalLM(), tmp_path / "d", 6, other, ckpt_path=str(ckpt))


def test_another_vocabulary_is_refused_before_training(tmp_path):
    module = CausalLM()
    teacher = tiny_llama(seed=1, vocab_size=VOCAB + 8)
    with refused_without_a_trace(module, AdapterConfigError, r"vocab_size=264, the student"):
        fit(module, tmp_path, 2, [Distillation(teacher)])


def test_self_distillation_uses_the_base_with_adapters_off(tmp_path):
    module = CausalLM(lr=5e-2)
    distill = Distillation("base", alpha=0.5)
    fit(module, tmp_path, 4, [PeftCallback(QV_LORA), distill])
    assert distill.last_kd.item() > 0  # the adapters moved the student away from its base
    plain = CausalLM()
    with pytest.raises(AdapterConfigError, match="the module has no adapters"):
        fit(plain, tmp_path / "b", 2, [Distillation("base")])
    assert "training_step" not in plain.__dict__  # a refused fit leaves no hook behind
    assert not plain.model._forward_hooks and not plain.model._forward_pre_hooks


def test_an_nf4_teacher_is_quantized_once_and_teaches(tmp_path):
    import bitsandbytes as bnb

    teacher = teacher_model()
    module = CausalLM()
    before = held_out_kl(module.model, teacher)
    fit(
        module,
        tmp_path,
        20,
        [Distillation(teacher, alpha=1.0, quantize="nf4")],
        data=token_data(48),
    )
    layer = teacher.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert held_out_kl(module.model, teacher) < 0.7 * before


def test_bad_arguments_are_refused_together():
    with pytest.raises(AdapterConfigError) as info:
        Distillation("teacher.pt", temperature=-1, alpha=2, quantize="q2")
    message = str(info.value)
    for part in (
        "teacher must be a model or 'base', got 'teacher.pt'",
        "temperature must be a positive finite number, got -1",
        "alpha must be in [0, 1] or None, got 2",
        "quantize must be None or one of ('nf4', 'fp4', 'int8'), got 'q2'",
    ):
        assert part in message


def test_manual_optimization_is_told_to_combine_the_loss_itself(tmp_path):
    class Manual(CausalLM):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(AdapterConfigError, match=r"optimizes manually .* pass alpha=None"):
        fit(Manual(), tmp_path, 2, [Distillation(teacher_model())])


class Seq2SeqLM(CausalLM):
    """An encoder-decoder whose training_step passes labels only (the decoder inputs are
    built from them inside the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = four_layers("t5").train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss


def test_an_encoder_decoder_student_learns_from_its_teacher(tmp_path):
    module = Seq2SeqLM()
    teacher = shrink(four_layers("t5"), keep=[0, 1, 2])
    distill = Distillation(teacher, alpha=1.0)
    fit(module, tmp_path, 3, [distill])
    assert distill.last_kd is not None and distill.teacher_logits.shape[-1] == VOCAB


def test_a_second_fit_after_a_failed_one_distills_into_the_new_module(tmp_path):
    class Boom(CausalLM):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    distill = Distillation(teacher_model(), alpha=0.5)
    with pytest.raises(RuntimeError, match="boom"):
        fit(Boom(), tmp_path / "a", 3, [distill])
    distill.last_kd = None
    module = CausalLM()
    fit(module, tmp_path / "b", 2, [distill])
    assert distill.last_kd is not None and "training_step" not in module.__dict__


def test_the_base_as_teacher_runs_without_dropout_and_keeps_the_modes():
    from lightning_peft import LoRA, apply_adapters, disable_adapters

    model = tiny_llama(init_std=0.3)
    for layer in model.model.layers:  # dropout that would change the teacher's logits
        layer.self_attn.attention_dropout = 0.5
    apply_adapters(model, LoRA(rank=4, dropout=0.5))
    distill = Distillation("base", alpha=None)
    model.register_forward_pre_hook(distill._before_student, with_kwargs=True, prepend=True)
    model.register_forward_hook(distill._after_student, with_kwargs=True)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    distill._armed = True
    model(input_ids=ids)
    distill._armed = False
    assert model.training and all(m.training for m in model.modules())  # modes kept
    with torch.no_grad(), disable_adapters(model):
        expected = model.eval()(input_ids=ids).logits
    assert torch.equal(distill.teacher_logits, expected)


def test_prompt_tuning_students_get_a_teacher_on_their_own_inputs(tmp_path):
    from lightning_peft import PromptTuning

    distill = Distillation(teacher_model(), alpha=0.5)
    fit(CausalLM(), tmp_path, 2, [PeftCallback(PromptTuning(num_virtual_tokens=4)), distill])
    assert distill.teacher_logits.shape[1] == 16  # the rows' 16 tokens, not 4 + 16


def test_another_label_count_is_refused_before_training(tmp_path):
    class Classifier(CausalLM):
        def __init__(self) -> None:
            super().__init__()
            self.model = four_layers("bert")  # 2 labels

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch[:, 0] % 2).loss

    teacher = four_layers("bert")
    teacher.config.num_labels = 5
    with pytest.raises(AdapterConfigError, match=r"num_labels=5, the student .* num_labels=2"):
        fit(Classifier(), tmp_path, 2, [Distillation(teacher)])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_kd_loss_refuses_a_teacher_whose_logits_are_not_finite(value):
    teacher = torch.full((2, 5), value)
    with pytest.raises(FloatingPointError, match=r"teacher logits are not finite: 10 of 10"):
        kd_loss(torch.zeros(2, 5), teacher)
    ruled_out = torch.tensor([[0.0, -float("inf")]])  # -inf: a class ruled out, allowed
    assert torch.isfinite(kd_loss(torch.zeros(1, 2), ruled_out))


class Overflowing(torch.nn.Module):
    """Wraps a teacher; from the third call on its logits overflow to +inf."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher, self.calls = teacher, 0
        self.config = teacher.config

    def forward(self, *args, **kwargs):
        self.calls += 1
        output = self.teacher(*args, **kwargs)
        if self.calls >= 3:
            output.logits = torch.full_like(output.logits, float("inf"))
        return output


def test_a_teacher_that_overflows_stops_training_naming_it_and_the_step(tmp_path):
    distill = Distillation(Overflowing(teacher_model()), alpha=0.5)
    with pytest.raises(AdapterStateError, match=r"at step 2: teacher Overflowing: teacher logits"):
        fit(CausalLM(), tmp_path, 4, [distill])


def test_a_teacher_on_the_meta_device_is_refused_at_construction():
    with torch.device("meta"):
        teacher = tiny_llama(seed=5)
    with pytest.raises(AdapterConfigError, match=r"weights on the meta device .* load its weights"):
        Distillation(teacher)


class WithTokenizer(CausalLM):
    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer


class Vocabulary:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_a_teacher_with_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    ours = {f"t{i}": i for i in range(VOCAB)}
    theirs = {**ours, "t0": 1, "t1": 0}  # the same size, two tokens swapped
    module = WithTokenizer(Vocabulary(ours))
    teacher = teacher_model()
    with refused_without_a_trace(
        module,
        AdapterConfigError,
        r"2 tokens differ, e.g. 't0': 0 for the student, 1 for the teacher",
    ):
        fit(module, tmp_path, 2, [Distillation(teacher, teacher_tokenizer=Vocabulary(theirs))])
    fit(module, tmp_path / "same", 1, [Distillation(teacher, teacher_tokenizer=Vocabulary(ours))])
