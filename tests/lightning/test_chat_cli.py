"""Chat instruction tuning from the YAML: ChatData's files, tokenizer and template options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lightning_peft import AdapterConfigError
from lightning_peft.lightning.chat import ChatData
from lightning_peft.lightning.cli import main
from lightning_peft.sft import IGNORE

pytestmark = pytest.mark.slow  # SmolLM2's tokenizer (and model) from the asset package

CONFIG = "examples/configs/smollm2-chat-qlora.yaml"
# A template unlike SmolLM2's own, so the tests can tell which one was used.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHATS = [
    {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
    for w in ("yes", "no", "maybe", "never")
]


def write_chats(path, rows=CHATS):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_files_and_a_template_file_make_completion_only_batches(tmp_path):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    data = ChatData(
        train_file=write_chats(tmp_path / "train.jsonl"),
        val_file=write_chats(tmp_path / "val.jsonl", CHATS[:2]),
        chat_template=str(tmp_path / "t.jinja"),
        batch_size=4,
    )
    assert data.tokenizer.chat_template == TEMPLATE
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    decoded = data.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert decoded.startswith("<|user|>Say ")  # rendered with the given template
    trained = [
        data.tokenizer.decode([t for t in row if t != IGNORE]) for row in batch["labels"].tolist()
    ]
    assert sorted(trained) == sorted(f"{w}<|end|>\n" for w in ("yes", "no", "maybe", "never"))
    assert len(data.val_rows) == 2


def test_without_files_it_serves_the_built_in_review_chats():
    data = ChatData(train_size=8, val_size=4)
    assert len(data.train_rows) == 8 and len(data.val_rows) == 4
    answers = {row["messages"][-1]["content"] for row in data.train_rows}
    assert answers == {"negative", "positive"}
    assert "{%" in data.tokenizer.chat_template  # SmolLM2's own template


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"messages": []}'], r"bad\.jsonl:1: expected \{\"messages\""),
        (
            ['{"messages": [{"role": "user", "content": "hi"}]}', "not json"],
            r"bad\.jsonl:2: not JSON",
        ),
        (['{"text": "hi"}'], r"bad\.jsonl:1: expected"),
        ([""], r"holds no rows"),
    ],
)
def test_bad_rows_are_refused_with_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AdapterConfigError, match=message):
        ChatData(train_file=str(path))


def test_bad_paths_and_templates_are_refused_before_training(tmp_path):
    with pytest.raises(AdapterConfigError, match=r"chat file 'missing.jsonl' does not exist"):
        ChatData(train_file="missing.jsonl")
    with pytest.raises(AdapterConfigError, match=r"tokenizer 'org/some-model' is not a folder"):
        ChatData(tokenizer="org/some-model")
    with pytest.raises(
        AdapterConfigError, match=r"'t.jinja' is neither a Jinja template nor an existing file"
    ):
        ChatData(chat_template="t.jinja")
    with pytest.raises(AdapterConfigError, match="row 1: the chat template cannot render it"):
        ChatData(chat_template="{{ messages[0]['nope'] + 1 }}", train_size=2, val_size=2)


def test_rows_with_nothing_to_train_on_are_refused_with_their_numbers(tmp_path):
    rows = [*CHATS, {"messages": [{"role": "user", "content": "no answer"}]}]
    with pytest.raises(
        AdapterConfigError, match=r"1 row\(s\) have no token to train on \(rows 5\)"
    ):
        ChatData(train_file=write_chats(tmp_path / "t.jsonl", rows))
    long = [{"messages": [{"role": "user", "content": "word " * 300}, CHATS[0]["messages"][1]]}]
    with pytest.raises(AdapterConfigError, match=r"beyond max_length=32"):
        ChatData(train_file=write_chats(tmp_path / "l.jsonl", long), max_length=32)


def test_raw_line_separators_and_a_byte_order_mark_are_valid_json_lines(tmp_path):
    row = {"messages": [{"role": "user", "content": "a\u2028b\u0085c"}, CHATS[0]["messages"][1]]}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8-sig")
    data = ChatData(train_file=str(path))
    assert data.train_rows == [row]


def test_fit_from_the_chat_yaml_with_a_template_then_export(tmp_path, monkeypatch, capsys):
    root = os.getcwd()
    monkeypatch.chdir(tmp_path)  # the YAML writes under runs/
    config = os.path.join(root, CONFIG)
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    data_args = [
        "--data.init_args.train_file",
        write_chats(tmp_path / "train.jsonl"),
        "--data.init_args.val_file",
        write_chats(tmp_path / "val.jsonl", CHATS[:2]),
        "--data.init_args.chat_template",
        "t.jinja",
        "--data.init_args.batch_size",
        "2",
    ]
    main(["fit", "--config", config, "--trainer.max_steps", "2", *data_args])
    out = capsys.readouterr().out
    # GenerationSamples ran at the end of training's validation, under the step the
    # loggers record it at (Lightning counts the batches that stepped before it: 1)
    assert "[step 1]" in out
    folder = tmp_path / "runs/chat/checkpoints/chat-peft"
    assert AutoTokenizer.from_pretrained(folder).chat_template == TEMPLATE
    # The base it names is the local folder it was loaded from: it loads offline.
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (Path(base) / "config.json").is_file(), base
    ckpt = tmp_path / "runs/chat/checkpoints/chat.ckpt"
    main(["export", "--config", config, *data_args, "--ckpt", str(ckpt), "--peft-dir", "peft"])
    assert AutoTokenizer.from_pretrained(tmp_path / "peft").chat_template == TEMPLATE
    # The template travels in the checkpoint: an export that does not repeat the flag
    # writes the one the run trained with, not the tokenizer's default.
    assert torch.load(ckpt, weights_only=True)["lightning_peft"]["chat_template"] == TEMPLATE
    main(["export", "--config", config, *data_args[:4], "--ckpt", str(ckpt), "--peft-dir", "p2"])
    assert AutoTokenizer.from_pretrained(tmp_path / "p2").chat_template == TEMPLATE


def test_files_that_are_not_utf8_or_not_files_are_refused_with_file_and_line(tmp_path):
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text(json.dumps(CHATS[0]) + "\n", encoding="utf-16")
    with pytest.raises(AdapterConfigError, match=r"utf16.jsonl:1: not UTF-8 text .*UTF-16"):
        ChatData(train_file=str(utf16))
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(json.dumps(CHATS[0]).encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(AdapterConfigError, match=r"broken.jsonl:2: not UTF-8 text \(byte 0xff"):
        ChatData(train_file=str(broken))
    with pytest.raises(AdapterConfigError, match=r"is a folder; give the JSON Lines file"):
        ChatData(train_file=str(tmp_path))
    with pytest.raises(AdapterConfigError, match=r"neither a Jinja template nor an existing file"):
        ChatData(chat_template="templates/chat_{model}.jinja")


RESUME_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {max_steps}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_peft.PeftCallback
      init_args:
        adapters:
          class_path: lightning_peft.LoRA
          init_args: {{rank: 4, dropout: 0.2, target_modules: [q_proj, v_proj]}}
    - class_path: lightning_peft.AdapterCheckpoint
      init_args:
        {{dirpath: {checkpoints}, filename: "{{step}}", every_n_train_steps: 1, save_top_k: -1}}
model:
  class_path: lightning_peft.lightning.chat.CausalLMTuning
  init_args: {{model: {model}, lr: 0.01}}
data:
  class_path: lightning_peft.lightning.chat.ChatData
  init_args: {{train_file: {train}, batch_size: 2, max_length: 64}}
"""


def test_a_chat_run_resumed_mid_epoch_from_the_command_line_is_exact(tmp_path):
    from lightning_peft.data import smollm2_tokenizer
    from tests.tiny_models import tiny_llama

    tiny_llama(vocab_size=len(smollm2_tokenizer())).save_pretrained(tmp_path / "model")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {w}."},
                {"role": "assistant", "content": w},
            ]
        }
        for w in ("yes", "no", "maybe", "never", "always", "soon")
    ]  # 3 batches an epoch: step 2 is mid-epoch

    def fit(name: str, max_steps: int, *extra: str) -> Path:
        config = tmp_path / f"{name}.yaml"
        checkpoints = tmp_path / name
        config.write_text(
            RESUME_CONFIG.format(
                max_steps=max_steps,
                checkpoints=checkpoints,
                model=tmp_path / "model",
                train=write_chats(tmp_path / "train.jsonl", rows),
            )
        )
        main(["fit", "--config", str(config), *extra])
        return checkpoints

    straight = fit("straight", 5)
    first = fit("first", 2)
    resumed = fit("resumed", 5, "--ckpt_path", str(first / "step=2.ckpt"))
    for step in (3, 4, 5):
        expected = torch.load(straight / f"step={step}.ckpt", weights_only=True)["state_dict"]
        got = torch.load(resumed / f"step={step}.ckpt", weights_only=True)["state_dict"]
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), step


def test_predict_writes_answers_beside_the_prompts_and_validate_reports_generation_metrics(
    tmp_path, capsys
):
    from lightning_peft.data import smollm2_tokenizer
    from lightning_peft.lightning.cli import load_adapter_checkpoint
    from tests.tiny_models import tiny_llama

    tokenizer = smollm2_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    config = tmp_path / "chat.yaml"
    config.write_text(
        RESUME_CONFIG.format(
            max_steps=2,
            checkpoints=tmp_path / "checkpoints",
            model=tmp_path / "model",
            train=write_chats(tmp_path / "train.jsonl"),
        )
    )
    main(["fit", "--config", str(config)])
    ckpt = str(tmp_path / "checkpoints" / "step=2.ckpt")
    prompts = [{"messages": row["messages"][:1]} for row in CHATS]  # end where answers start
    predict_file = write_chats(tmp_path / "held_out.jsonl", prompts)
    generation = ["--model.init_args.max_new_tokens", "3"]
    main(["predict", "--config", str(config), "--ckpt_path", ckpt, *generation,
          "--data.init_args.predict_file", predict_file])  # fmt: skip
    written = tmp_path / "held_out.predictions.jsonl"
    assert f"4 predictions written to {written}" in capsys.readouterr().out
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert [line["messages"] for line in lines] == [p["messages"] for p in prompts]

    # Each is what the trained model generates for that prompt alone, greedily.
    module = load_adapter_checkpoint(str(config), ckpt)
    module.model.eval()
    for line, prompt in zip(lines, prompts, strict=True):
        text = tokenizer.apply_chat_template(
            prompt["messages"], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = module.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
        assert line["prediction"] == tokenizer.decode(
            out[0, ids.shape[1] :], skip_special_tokens=True
        )

    main(["validate", "--config", str(config), "--ckpt_path", ckpt, *generation,
          "--data.init_args.val_file", write_chats(tmp_path / "val.jsonl"),
          "--model.init_args.val_metrics", "[exact_match, 'regex:.']"])  # fmt: skip
    out = capsys.readouterr().out
    assert "val_exact_match" in out and "val_regex" in out


def test_bad_generation_metrics_are_refused_at_construction():
    from lightning_peft.lightning.chat import CausalLMTuning

    with pytest.raises(AdapterConfigError, match=r"takes 'exact_match' and 'regex:<pattern>'"):
        CausalLMTuning(model="nowhere", val_metrics=["bleu"])
    with pytest.raises(AdapterConfigError, match=r"'regex:\(' does not compile"):
        CausalLMTuning(model="nowhere", val_metrics=["regex:("])
