"""Teach the embedded toy a task of your own: extend its word vocabulary and fine-tune it, on CPU, in minutes.

`teach(task, out)` (CLI: `modality-circuits teach --task-file my_task.py`) samples the task's prompts in both
modalities, adds every word the toy's tokenizer does not know (new embedding rows start at the mean of the old
ones), fine-tunes the language model and the projector on the answer token (next-token loss at the last position)
with the five built-in tasks' training prompts rehearsed in every batch and the vision tower frozen, so they are not
forgotten, stops when held-out accuracy reaches the targets on the new task and stays within `keep` of the start on
the built-in ones, or when the time runs out, and writes the checkpoint closest to those targets as a model folder
`load_model(out)` loads (with the toy's wording).
Accuracy is measured as the package measures it (`methods.predict.correct`: top-1 next token == the answer's
first token) on prompts from seeds never used for training.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.pairs import answer_token, chat_text
from ..data.tasks import MODALITIES, TASKS, get_task, sample_pairs
from ..execution.store import write_json
from ..methods.predict import correct

MARKER = "modality_circuits.json"  # in a taught folder: {"wording": "toy", "taught": [...]}, read by load_model
TRAIN_SEED, VAL_SEED, TEST_SEED = 7_000_001, 7_000_003, 7_000_007


def _prompts(task: str, modality: str, n: int, seed: int) -> list:
    """n prompts (each pair's prompt and counterfactual) of one task and modality, toy wording, 64-pixel images."""
    return [p for pair in sample_pairs(task, modality, max(1, n // 2), seed=seed, image_size=64) for p in pair][:n]


def new_words(tokenizer, prompts) -> list[str]:
    """Words of the prompts' texts and answers that the word-level tokenizer maps to <unk>, in first-seen order."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    vocab = tokenizer.get_vocab()
    found = {}
    for p in prompts:
        for text in (p.data if p.modality == "text" else "", p.query, p.answer):
            for word, _ in pre.pre_tokenize_str(text or ""):
                if word not in vocab:
                    found.setdefault(word)
    return list(found)


def _extend_vocabulary(folder: Path, words: list[str]) -> None:
    """Append `words` to the WordLevel vocabulary in folder/tokenizer.json (ids after the last one)."""
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    top = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    for k, word in enumerate(words):
        vocab[word] = top + k
    path.write_text(json.dumps(spec, ensure_ascii=False))


def _batch(model, prompts) -> list[tuple[dict, torch.Tensor]]:
    """[(processor inputs padded on the left (the toy's padding side), answer ids)], one batch per modality."""
    out = []
    for modality in MODALITIES:
        group = [p for p in prompts if p.modality == modality]
        if not group:
            continue
        texts = [chat_text(model, p) for p in group]
        if modality == "image":
            inputs = model.processor(text=texts, images=[[p.image] for p in group], return_tensors="pt", padding=True,
                                     add_special_tokens=False)
        else:
            inputs = model.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out.append((dict(inputs), torch.tensor([answer_token(model, t, p) for t, p in zip(texts, group)])))
    return out


def _loss(model, batches) -> torch.Tensor:
    """Mean next-token cross-entropy of the answer id at the last position over the batches."""
    losses = []
    for inputs, ids in batches:
        logits = model.hf_model(**inputs).logits[:, -1].float()
        losses.append(F.cross_entropy(logits, ids, reduction="sum"))
    return sum(losses) / sum(len(ids) for _, ids in batches)


def _builtin(n: int, seed: int) -> list:
    """n prompts of each built-in task in each modality."""
    return [p for t in TASKS for m in MODALITIES for p in _prompts(t, m, n, seed)]


def _accuracy(model, prompts) -> float:
    return float(sum(correct(model, prompts))) / len(prompts)


def teach(task: str, out: str | Path, *, base: str = "toy", minutes: float = 10.0, batch: int = 24,
          image_share: float = 2 / 3, replay: int = 32, lr: float = 2e-4, targets=(0.95, 0.9), keep: float = 0.03,
          eval_every: int = 25, n_eval: int = 64, n_builtin: int = 16, n_test: int = 200, n_pool: int = 2000,
          seed: int = 0, progress: bool = True, max_steps: int | None = None) -> dict:
    """Fine-tune the toy (`base`: "toy" or a taught folder) on `task` (registered) in both modalities; write the
    model to `out`; return the report (also out/teach_report.json): words added, steps, CPU and wall seconds,
    held-out accuracy per modality on n_test prompts, and the built-in tasks' accuracy before and after.

    batch: new-task prompts per step (`image_share` of them images: images are learnt more slowly); replay: training
    prompts of the built-in tasks per step (both modalities). Every `eval_every` steps: validation accuracy on n_eval
    prompts per modality and on n_builtin per built-in task and modality; stops once it reaches `targets` (text, image)
    and the built-in accuracy is within `keep` of its start, else after `minutes` (wall clock, set-up included) or
    `max_steps`; keeps the checkpoint with the largest smallest margin to the three targets (`chosen_step`).
    """
    from ..zoo import load_model

    get_task(task)
    if task in TASKS:
        raise ValueError(f"{task!r} is a built-in task: the toy knows it already")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder for the taught model")
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = load_model(base)
    source = Path(model.hf_model.config._name_or_path or "")
    if not (source / "tokenizer.json").is_file():
        raise ValueError(f"teach needs a model folder with a word-level tokenizer.json (the toy's); {base!r} has none")
    pool = {m: _prompts(task, m, n_pool, TRAIN_SEED + seed) for m in MODALITIES}  # training prompts
    words = new_words(model.tokenizer, pool["text"] + pool["image"] + _prompts(task, "text", 200, TEST_SEED))

    # the new folder: the base's files, the vocabulary extended, embeddings resized (new rows: the mean of the old)
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    _extend_vocabulary(out, words)
    old = model.hf_model.get_input_embeddings().weight.shape[0]
    hf = model.hf_model
    hf.resize_token_embeddings(old + len(words), mean_resizing=False)
    with torch.no_grad():
        emb = hf.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0)
    hf.save_pretrained(out)
    model = load_model(str(out))  # the extended tokenizer and processor, through the package's own loader
    model.wording = "toy"
    hf = model.hf_model
    hf.train()

    replay_pool = [p for t in TASKS for m in MODALITIES for p in _prompts(t, m, n_pool // 5, TRAIN_SEED + 1 + seed)]
    val = {m: _prompts(task, m, n_eval, VAL_SEED + seed) for m in MODALITIES}
    builtin_val, builtin_test = (_builtin(n_builtin, k + seed) for k in (VAL_SEED, TEST_SEED))
    hf.eval()
    before = {m: _accuracy(model, val[m]) for m in MODALITIES}
    kept_val = _accuracy(model, builtin_val) - keep  # the third target: built-in accuracy within `keep` of the start
    old_before = _accuracy(model, builtin_test)
    hf.train()
    hf.requires_grad_(True)  # load_model freezes the weights (the methods differentiate activations only)
    hf.model.vision_tower.requires_grad_(False)  # the toy (LLaVA): the built-in tasks' image features stay as they were
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    best, best_state, chosen, history, step = float("-inf"), None, None, [], 0
    bar = tqdm(desc=f"teach {task}", disable=not progress, unit="step")
    while step == 0 or time.perf_counter() - start_wall < 60 * minutes:  # the clock includes the set-up
        n_image = round(batch * image_share)
        prompts = rng.choices(pool["text"], k=batch - n_image) + rng.choices(pool["image"], k=n_image) + \
            rng.choices(replay_pool, k=replay)
        loss = _loss(model, _batch(model, prompts))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % eval_every == 0:
            hf.eval()
            with torch.no_grad():
                acc = (*(_accuracy(model, val[m]) for m in MODALITIES), _accuracy(model, builtin_val))
            hf.train()
            history.append({"step": step, "loss": loss.item(), "text": acc[0], "image": acc[1], "builtin": acc[2],
                            "wall_s": time.perf_counter() - start_wall})
            bar.write(f"step {step}: loss {loss.item():.3f}, validation accuracy text {acc[0]:.2f}, image {acc[1]:.2f}, "
                      f"built-in tasks {acc[2]:.3f}")
            margin = min(acc[0] - targets[0], acc[1] - targets[1], acc[2] - kept_val)  # >= 0: every target met
            if margin > best:
                best, chosen, best_state = margin, step, {k: v.detach().clone() for k, v in hf.state_dict().items()}
            if margin >= 0:
                break
        if max_steps is not None and step >= max_steps:
            break
    bar.close()
    if best_state is not None:
        hf.load_state_dict(best_state)
    hf.eval()
    hf.requires_grad_(False)
    hf.save_pretrained(out)
    write_json(out / MARKER, {"wording": "toy", "taught": [task], "base": base})
    train_wall, train_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    taught = load_model(str(out))  # what the user gets: the folder as load_model reads it
    test = {m: _accuracy(taught, _prompts(task, m, n_test, TEST_SEED + seed)) for m in MODALITIES}
    old_after = _accuracy(taught, builtin_test)
    settings = {"minutes": minutes, "max_steps": max_steps, "batch": batch, "image_share": image_share, "replay": replay,
                "lr": lr, "targets": list(targets), "keep": keep, "eval_every": eval_every, "n_eval": n_eval,
                "n_builtin": n_builtin, "n_pool": n_pool, "seed": seed}
    report = {"task": task, "base": base, "out": str(out), "settings": settings, "words_added": words, "steps": step,
              "chosen_step": chosen,
              "train_wall_s": train_wall, "train_cpu_s": train_cpu, "threads": torch.get_num_threads(),
              "accuracy_before": before, "test_accuracy": test, "n_test": n_test,
              "builtin_accuracy_before": old_before, "builtin_accuracy_after": old_after, "history": history}
    write_json(out / "teach_report.json", report)
    return report
