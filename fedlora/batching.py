"""Turning examples into model inputs: :class:`Collator` tokenises a list of examples (``text``/``label`` rows or
``prompt``/``response`` rows, as :mod:`fedlora.data` loads them) into a padded batch for the model's task."""

from __future__ import annotations

import torch

from .data import DataError
from .prompts import classification_prompt, encode_prompt


class Collator:
    """Tokenise a list of examples into a padded batch for the model's task.

    seq-cls:    input_ids, attention_mask, labels (class ids).
    causal-lm:  input_ids, attention_mask, labels (token ids, -100 on prompt and padding), and for
                classification data also ``class_labels`` and ``answer_pos`` (where the label word's first
                token is predicted) so accuracy can be read off the logits of the label words.
    """

    def __init__(self, tokenizer, task: str, max_length: int, label_words=None):
        self.tok, self.task, self.max_length = tokenizer, task, max_length
        self.label_words = list(label_words) if label_words else None
        if task == "causal-lm" and self.label_words:
            self.label_token_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in self.label_words]
            if len(set(self.label_token_ids)) != len(self.label_token_ids):
                raise DataError(f"label words {self.label_words} share their first token: "
                                "choose distinct data.label_words.")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.task == "seq-cls":
            enc = self.tok([e["text"] for e in examples], truncation=True, max_length=self.max_length,
                           padding=True, return_tensors="pt")
            enc["labels"] = torch.tensor([self._label(e, None) for e in examples])
            return dict(enc)
        return self._causal(examples)

    @staticmethod
    def _label(example, classes: int | None) -> int:
        """The example's class id, refused when it is not one the model holds (a -1 would silently become the
        last label word): :func:`load` drops unlabelled test rows and the pre-flight refuses the rest."""
        label = int(example["label"])
        if label < 0 or (classes is not None and label >= classes):
            raise DataError(f"label {label} is not a class id in [0, {classes if classes is not None else 'num_labels'}):"
                            " drop unlabelled rows or fix data.label_words / model.num_labels.")
        return label

    def _causal(self, examples):
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        seqs, labels, answer_pos, class_labels = [], [], [], []
        for e in examples:
            if "prompt" in e:
                prompt, response = e["prompt"], e["response"]
            else:
                if not self.label_words:
                    raise DataError("a causal LM on classification data needs data.label_words, "
                                    "e.g. [negative,positive].")
                prompt = classification_prompt(self.tok, e["text"], self.label_words)
                label = self._label(e, len(self.label_words))
                response = self.label_words[label]
                class_labels.append(label)
            r_ids = self.tok(response, add_special_tokens=False)["input_ids"]
            if self.tok.eos_token_id is not None:
                r_ids = r_ids + [self.tok.eos_token_id]
            budget = self.max_length - len(r_ids)
            p_ids = encode_prompt(self.tok, prompt, budget)  # chat template, if any; the end kept, next to the answer
            ids = (p_ids + r_ids)[: self.max_length]
            lab = ([-100] * len(p_ids) + r_ids)[: self.max_length]
            seqs.append(ids)
            labels.append(lab)
            answer_pos.append(len(p_ids) - 1)
        T = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        lab_t = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            lab_t[i, : len(lab)] = torch.tensor(lab)
        batch = {"input_ids": input_ids, "attention_mask": attn, "labels": lab_t}
        if class_labels:
            batch["class_labels"] = torch.tensor(class_labels)
            batch["answer_pos"] = torch.tensor(answer_pos)
        return batch
