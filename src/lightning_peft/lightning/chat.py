"""Chat instruction tuning from the command line: a causal-LM module and a chat data module.

``CausalLMTuning`` trains any causal LM on batches that carry their own ``labels``;
``ChatData`` reads ``{"messages": [...]}`` rows from JSON Lines files, renders them with a
tokenizer's chat template (or one given) and batches them with
:class:`~lightning_peft.sft.ChatCollator`. Neither knows about adapters: the YAML's
``PeftCallback`` or ``--trainer.precision nf4-lora`` brings them. Without files, ``ChatData``
serves the built-in example: Rotten Tomatoes reviews as one-word questions to SmolLM2.

    lightning-peft fit --config examples/configs/smollm2-chat-qlora.yaml
    lightning-peft fit --config ... --data.train_file my_chats.jsonl --data.chat_template t.jinja
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_peft.data import ListDataset
from lightning_peft.errors import AdapterConfigError
from lightning_peft.lightning.predictions import answer_metrics, generate_answers
from lightning_peft.sft import IGNORE, ChatCollator

BUILT_IN = "smollm2"  # SmolLM2-135M-Instruct, installed with the package data
QUESTION = "Is this movie review positive or negative? Answer with one word.\n\n{review}"
ANSWERS = ("negative", "positive")


def review_chat(review: str, label: int | None = None) -> dict[str, Any]:
    """A Rotten Tomatoes review as a conversation; with ``label``, the assistant's answer."""
    messages = [{"role": "user", "content": QUESTION.format(review=review)}]
    if label is not None:
        messages.append({"role": "assistant", "content": ANSWERS[label]})
    return {"messages": messages}


def load_tokenizer(name_or_path: str) -> Any:
    """``"smollm2"`` (the built-in model's tokenizer) or a local folder holding a tokenizer."""
    if name_or_path == BUILT_IN:
        from lightning_peft.data import smollm2_tokenizer

        return smollm2_tokenizer()
    if not Path(name_or_path).is_dir():
        raise AdapterConfigError(
            f"tokenizer {name_or_path!r} is not a folder; give a local folder a tokenizer was "
            f"saved to (save_pretrained), or {BUILT_IN!r} for the built-in one (nothing is "
            "downloaded)"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def read_chats(path: str) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file, each checked to be
    ``{"messages": [{"role", "content"}, ...]}``.

    Raises:
        AdapterConfigError: a missing file, or a row that is not a conversation (file and
            line named).
    """
    file = Path(path)
    if file.is_dir():
        raise AdapterConfigError(
            f"chat file {path!r} is a folder; give the JSON Lines file inside it"
        )
    if not file.is_file():
        raise AdapterConfigError(f"chat file {path!r} does not exist")
    rows = []
    # Lines end at "\n" only: str.splitlines would also split at U+2028 and U+0085, which
    # JSON strings may hold raw. utf-8-sig accepts a byte-order mark.
    text = _read_utf8(file)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise AdapterConfigError(f"{path}:{number}: not JSON ({error.msg})") from error
        messages = row.get("messages") if isinstance(row, dict) else None
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise AdapterConfigError(
                f"{path}:{number}: expected "
                f'{{"messages": [{{"role": ..., "content": ...}}, ...]}}, '
                f"got {line[:80]!r}"
            )
        rows.append(row)
    if not rows:
        raise AdapterConfigError(f"chat file {path!r} holds no rows")
    return rows


def _read_utf8(file: Path) -> str:
    """The file's text, or a refusal naming the line and byte that are not UTF-8."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        hint = (
            " (it looks like UTF-16: save it as UTF-8)"
            if data[:2] in (b"\xff\xfe", b"\xfe\xff")
            else ""
        )
        raise AdapterConfigError(
            f"{file}:{line}: not UTF-8 text (byte {data[error.start]:#04x} at offset "
            f"{error.start}){hint}; JSON Lines files are UTF-8"
        ) from error


def _looks_like_a_path(value: str) -> bool:
    """Every Jinja template has a tag (``{{`` or ``{%``); a name ending like a template
    file is a path even when braces are in it."""
    name = value.strip()
    return ("{{" not in name and "{%" not in name) or (
        not any(c.isspace() for c in name) and name.endswith((".jinja", ".jinja2", ".j2"))
    )


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except OSError:  # a template too long to be a path
        return False


def encode_rows(
    collate: ChatCollator, rows: list[dict[str, Any]], source: str
) -> list[tuple[list[int], list[int]]]:
    """Every row rendered and tokenized once, before training (the batches reuse them): a
    template that fails on some row, or a row with nothing to train on (no assistant turn,
    or one cut off by ``max_length``; a batch of such rows has a NaN loss), is refused with
    its row numbers.

    Raises:
        AdapterConfigError: naming the rows.
    """
    encoded, empty = [], []
    for number, row in enumerate(rows, start=1):
        try:
            ids, labels = collate.encode(row["messages"])
        except AdapterConfigError as error:
            raise AdapterConfigError(f"{source}, row {number}: {error}") from error
        except Exception as error:  # the template's own error (jinja2, a missing key)
            raise AdapterConfigError(
                f"{source}, row {number}: the chat template cannot render it: {error}"
            ) from error
        if all(label == IGNORE for label in labels):
            empty.append(number)
        encoded.append((ids, labels))
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise AdapterConfigError(
            f"{source}: {len(empty)} row(s) have no token to train on (rows {shown}): no "
            f"assistant turn, or one beyond max_length={collate.max_length}. Give them an "
            "assistant turn, raise max_length, or drop them"
        )
    return encoded


def stateful_dataloader_class() -> type[DataLoader]:
    """torchdata's ``StatefulDataLoader`` (a ``DataLoader`` whose position Lightning saves)
    when torchdata is installed, else ``DataLoader``."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return DataLoader
    return StatefulDataLoader


class ChatData(pl.LightningDataModule):
    """Chat rows batched for instruction tuning.

    Args:
        train_file: JSON Lines, one ``{"messages": [...]}`` per line. Default: the built-in
            example (Rotten Tomatoes reviews as chats, ``train_size`` of them).
        val_file: the same, for validation. Default: ``val_size`` held-out built-in rows when
            ``train_file`` is not given, else no validation.
        tokenizer: a local folder holding a tokenizer, or ``"smollm2"`` (the built-in model's).
        chat_template: replaces the tokenizer's template: a Jinja string, or a path to a file
            holding one. It is saved with the tokenizer in exports.
        max_length: tokens per row (cut beyond), or per packed sequence.
        train_on: ``"assistant"`` (loss on the assistant's turns only) or ``"all"``.
        pack: pack rows into ``max_length`` sequences instead of padding each.
        batch_size: rows (or packed sequences' worth of rows) per batch.
        train_size, val_size, seed: the built-in example's split.

    Raises:
        AdapterConfigError: at construction, before any training: a missing file, a row that
            is not a conversation or has nothing to train on, a tokenizer folder that does not
            exist, a template that does not render a row, or a bad collator option.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        tokenizer: str = BUILT_IN,
        chat_template: str | None = None,
        max_length: int = 256,
        train_on: Literal["assistant", "all"] = "assistant",
        pack: bool = False,
        batch_size: int = 8,
        train_size: int = 480,
        val_size: int = 16,
        seed: int = 0,
        predict_file: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer)
        if chat_template is not None:
            if _is_file(chat_template):
                chat_template = _read_utf8(Path(chat_template))
            elif _looks_like_a_path(chat_template):
                raise AdapterConfigError(
                    f"chat_template {chat_template!r} is neither a Jinja template nor an "
                    "existing file"
                )
            self.tokenizer.chat_template = chat_template
        self.collate = ChatCollator(self.tokenizer, max_length, train_on, pack)
        if train_file is None:
            from lightning_peft.data import rotten_tomatoes, stratified_split

            train, held_out = stratified_split(rotten_tomatoes(), train_size, val_size, seed=seed)
            self.train_rows = [review_chat(text, label) for text, label in train]
            self.val_rows = [review_chat(text, label) for text, label in held_out]
        else:
            self.train_rows = read_chats(train_file)
            self.val_rows = []
        if val_file is not None:
            self.val_rows = read_chats(val_file)
        self.train_encoded = encode_rows(
            self.collate, self.train_rows, train_file or "the built-in rows"
        )
        self.val_encoded = encode_rows(self.collate, self.val_rows, val_file or "the built-in rows")
        # What generation metrics and predictions start from: each row up to its answer.
        self.val_prompts = encode_prompts(self.collate, self.val_rows, val_file or "built-in")
        self.predict_file = predict_file
        self.predict_rows = read_chats(predict_file) if predict_file is not None else []
        self.predict_prompts = encode_prompts(self.collate, self.predict_rows, predict_file or "")
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        # torchdata's StatefulDataLoader where installed: Lightning saves and restores its
        # position, so a run resumed from a mid-epoch checkpoint sees the batches it would
        # have. (A plain DataLoader restarts the epoch's shuffle.)
        return stateful_dataloader_class()(
            ListDataset(self.train_encoded),
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self.collate.batch,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_encoded:
            return []
        return DataLoader(
            ListDataset(self.val_encoded), batch_size=self.batch_size, collate_fn=self.collate.batch
        )

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_rows:
            raise AdapterConfigError(
                "ChatData has no rows to predict: give --data.init_args.predict_file (JSON "
                'Lines of {"messages": [...]}, each ending where the answer should start)'
            )
        indexed = list(enumerate(ids for ids, _ in self.predict_prompts))
        return DataLoader(
            ListDataset(indexed),
            batch_size=self.batch_size,
            collate_fn=lambda rows: {
                **self.collate.prompt_batch([ids for _, ids in rows]),
                "index": [index for index, _ in rows],
            },
        )


def encode_prompts(
    collate: ChatCollator, rows: list[dict[str, Any]], source: str
) -> list[tuple[list[int], str | None]]:
    """Each row's prompt and reference (:meth:`ChatCollator.encode_prompt`), rows named."""
    prompts = []
    for number, row in enumerate(rows, start=1):
        try:
            prompts.append(collate.encode_prompt(row["messages"]))
        except Exception as error:  # the template's own error (jinja2, a missing key)
            raise AdapterConfigError(
                f"{source}, row {number}: the chat template cannot render its prompt: {error}"
            ) from error
    return prompts


_GENERATION_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_p", "val_metrics")


class CausalLMTuning(pl.LightningModule):
    """A causal LM trained on its own loss (batches bring ``labels``); knows nothing of adapters.

    Args:
        model: a local folder holding a transformers causal LM (``save_pretrained``), or
            ``"smollm2"`` for the built-in SmolLM2-135M-Instruct.
        lr: AdamW learning rate over the trainable tensors.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up of the learning rate, then constant.
        max_new_tokens, do_sample, temperature, top_p: how ``predict`` and ``val_metrics``
            generate answers (greedy by default).
        val_metrics: metrics of generated answers against the validation rows' last
            assistant message, logged after each validation as ``val_<name>``:
            ``"exact_match"``, ``"regex:<pattern>"`` (the answer must match it).
    """

    def __init__(
        self,
        model: str = BUILT_IN,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        val_metrics: list[str] | None = None,
    ) -> None:
        super().__init__()
        # How to generate is chosen per command, not by the checkpoint: LightningCLI puts a
        # checkpoint's hyperparameters over the command line's (predict --ckpt_path ...).
        self.save_hyperparameters(ignore=list(_GENERATION_OPTIONS))
        try:
            self.metrics = answer_metrics(val_metrics or [])
        except ValueError as error:
            raise AdapterConfigError(str(error)) from error
        if isinstance(max_new_tokens, bool) or not (
            isinstance(max_new_tokens, int) and max_new_tokens > 0
        ):
            raise AdapterConfigError(
                f"max_new_tokens must be a positive int, got {max_new_tokens!r}"
            )
        generation: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            generation.update(temperature=temperature, top_p=top_p)
        self.generation = generation
        if model == BUILT_IN:
            from lightning_peft.data import load_smollm2

            self.model, _ = load_smollm2()
        elif Path(model).is_dir():
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(model)
        else:
            raise AdapterConfigError(
                f"model {model!r} is not a folder; give a local folder a causal LM was saved "
                f"to (save_pretrained), or {BUILT_IN!r} for the built-in one"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rows = len(batch["input_ids"])
        self.log("val_loss", self.model(**batch).loss, prog_bar=True, batch_size=rows)

    def on_validation_epoch_end(self) -> None:
        """Generate an answer for every validation row and log ``val_metrics`` on them."""
        datamodule: Any = getattr(self.trainer, "datamodule", None)
        prompts = [p for p in getattr(datamodule, "val_prompts", []) if p[1] is not None]
        if not self.metrics or not prompts or self.trainer.sanity_checking:
            return
        scores = {name: 0 for name in self.metrics}
        size = datamodule.batch_size
        with torch.random.fork_rng(devices=[]):  # sampling leaves training's draws alone
            for start in range(0, len(prompts), size):
                chunk = prompts[start : start + size]
                batch = datamodule.collate.prompt_batch([ids for ids, _ in chunk])
                answers = generate_answers(
                    self.model, datamodule.tokenizer, batch, **self.generation
                )
                for answer, (_, reference) in zip(answers, chunk, strict=True):
                    for name, metric in self.metrics.items():
                        scores[name] += metric(answer, reference)
        for name, hits in scores.items():
            self.log(f"val_{name}", hits / len(prompts), prog_bar=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """The answers to a batch of prompts (``ChatData.predict_dataloader``)."""
        datamodule: Any = cast(Any, self.trainer).datamodule  # set by Lightning, not declared
        answers = generate_answers(self.model, datamodule.tokenizer, batch, **self.generation)
        return [
            {"index": index, "prediction": answer}
            for index, answer in zip(batch["index"], answers, strict=True)
        ]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        warmup = max(1, self.hparams["warmup_steps"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
