"""The eval CLI on a tiny export: answers format, metrics, resume, left-padded batched generation ==
one-by-one, POPE scoring by hand, the JSD estimator on known distributions."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from test_train_fixtures import QUESTION, make_uniform_dataset
from tolerances import TOL

from vittle_fast.eval import __main__ as cli
from vittle_fast.eval import gaussian_jsd, pope_scores, pope_yes_no, summarize
from vittle_fast.eval.representation import compare_hidden, cosine_distance
from vittle_fast.eval.runner import ExportedModel, left_pad
from vittle_fast.models import LlavaVittle, save_pretrained
from vittle_fast.nn import VittleConfig

N_QUESTIONS = 7


def tiny_model(vocab_size, image_token_id, vittle=True):
    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    config = VittleConfig(layer_v=1, layer_t=1, backend="reference") if vittle else None
    return LlavaVittle(text, vision, image_token_id, config).eval()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An exported tiny Vittle model with its tokenizer, a question JSONL with references, images."""
    root = tmp_path_factory.mktemp("eval")
    data_dir = root / "data"
    make_uniform_dataset(data_dir, num_records=N_QUESTIONS, image_size=16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    model = tiny_model(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    model.bottleneck.config.alpha = 0.37  # what the trainer's export records: the last step's alpha
    save_pretrained(model, root / "export")
    tokenizer.save_pretrained(root / "export")
    records = json.loads((data_dir / "train.json").read_text())
    lines = [{"question_id": i, "image": r["image"], "text": QUESTION if i % 2 else QUESTION + " Answer briefly .",
              "answer": r["conversations"][1]["value"]} for i, r in enumerate(records)]
    (root / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def run_cli(export, out, *extra):
    return cli.main(["--model", str(export / "export"), "--questions", str(export / "questions.jsonl"),
                     "--images", str(export / "data"), "--out", str(out), "--max_new_tokens", "4",
                     "--no_progress", *extra])


def read_answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_alpha_is_the_exported_final_training_alpha(export):
    assert ExportedModel.load(export / "export").alpha == 0.37
    assert ExportedModel.load(export / "export", alpha=0.1).alpha == 0.1


def test_cli_writes_llava_answers_and_metrics(export, tmp_path):
    metrics = run_cli(export, tmp_path / "out", "--batch_size", "3")
    answers = read_answers(tmp_path / "out" / "answers.jsonl")
    assert [a["question_id"] for a in answers] == list(range(N_QUESTIONS))
    for a in answers:
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["model_id"] == "export" and isinstance(a["text"], str) and "<image>" not in a["prompt"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    # exact match recomputed here from the answers; NLL of question 0 from a plain unpadded forward.
    references = [a["metadata"]["reference"] for a in answers]
    assert metrics["exact_match"] == sum(a["text"].lower() == r for a, r in zip(answers, references)) / N_QUESTIONS
    exported = ExportedModel.load(export / "export")
    prompt, reference = exported.encode(exported_question(export, 0))
    ids = torch.tensor([prompt + reference])
    from PIL import Image

    from vittle_fast.data.image import preprocess_image
    pixels = preprocess_image(Image.open(export / "data" / "img_0.png"), 16)[None]
    logits = exported.model(ids, pixel_values=pixels, vittle_alpha=exported.alpha).logits[0, len(prompt) - 1:-1]
    nll = F.cross_entropy(logits, torch.tensor(reference), reduction="sum")
    torch.testing.assert_close(torch.tensor(answers[0]["metadata"]["nll_sum"]), nll, **TOL["fp32_sum"])
    assert answers[0]["metadata"]["n_ref_tokens"] == len(reference) == 2  # the colour and </s>


def exported_question(export, index):
    from vittle_fast.eval import load_questions
    return load_questions(export / "questions.jsonl")[index]


def test_resume_skips_answered_questions(export, tmp_path):
    out = tmp_path / "out"
    run_cli(export, out, "--limit", "3")
    first = read_answers(out / "answers.jsonl")
    assert len(first) == 3
    first[1]["text"] = "SENTINEL"  # were question 1 answered again, this would be overwritten
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in first))
    metrics = run_cli(export, out, "--batch_size", "2")
    answers = read_answers(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == list(range(N_QUESTIONS))
    assert answers[1]["text"] == "SENTINEL" and metrics["n_answers"] == N_QUESTIONS
    assert not list(out.glob("answers.part*"))


def test_left_padded_batch_equals_one_by_one(export):
    exported = ExportedModel.load(export / "export")
    model, tok = exported.model, exported.tokenizer
    from vittle_fast.eval import load_questions
    from vittle_fast.eval.runner import Evaluator
    evaluator = Evaluator(exported, export / "data")
    questions = load_questions(export / "questions.jsonl")[:3]
    prepared = [evaluator.prepare(q) for q in questions]
    prompts = [exported.encode(q)[0] for q, _ in prepared]
    assert len({len(p) for p in prompts}) > 1, "the prompts must differ in length"
    from vittle_fast.data.image import preprocess_image
    pixels = torch.stack([preprocess_image(img, 16) for _, img in prepared])
    ids, mask = left_pad(prompts, tok.pad_token_id)
    for use_cache in (True, False):
        batched = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=6, vittle_alpha=0.3,
                                 use_cache=use_cache)
        for row, prompt in enumerate(prompts):
            alone = model.generate(torch.tensor([prompt]), pixels[row:row + 1], max_new_tokens=6, vittle_alpha=0.3)
            assert torch.equal(batched[row], alone[0]), (row, use_cache)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=positions, pixel_values=pixels, vittle_alpha=0.3).logits
    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt]), pixel_values=pixels[row:row + 1], vittle_alpha=0.3).logits[0]
        torch.testing.assert_close(logits[row, -len(prompt):], alone, **TOL["float32"])


def test_perturbed_run_and_hidden_dump(export, tmp_path):
    run_cli(export, tmp_path / "clean", "--dump-hidden")
    run_cli(export, tmp_path / "noisy", "--dump-hidden", "--perturb", "gaussian_noise:5")
    noisy = read_answers(tmp_path / "noisy" / "answers.jsonl")
    assert all(a["metadata"]["perturb"] == "gaussian_noise:5" for a in noisy)
    hidden = torch.load(tmp_path / "clean" / "hidden.pt")
    assert hidden["question_id"] == list(range(N_QUESTIONS)) and hidden["z"].shape == hidden["h"].shape == (N_QUESTIONS, 32)
    shift = compare_hidden(tmp_path / "clean" / "hidden.pt", tmp_path / "noisy" / "hidden.pt")
    assert shift["n"] == N_QUESTIONS and shift["z"]["cosine_distance"] > 0
    same = compare_hidden(tmp_path / "clean" / "hidden.pt", tmp_path / "clean" / "hidden.pt")
    assert abs(same["h"]["cosine_distance"]) < 1e-12 and same["h"]["jsd"] < 1e-9


def test_pope_scores_by_hand():
    assert [pope_yes_no(t) for t in ("Yes.", "No, there is not.", "There is no dog", "Not sure", "yes, no.")] == \
        ["yes", "no", "no", "yes", "no"]  # LLaVA's rule: "Not" (capital) is not a no-word
    predictions = ["Yes", "yes", "No", "no", "Yes", "No"]
    references = ["yes", "no", "no", "yes", "yes", "no"]
    # TP: rows 0, 4; FP: row 1; TN: rows 2, 5; FN: row 3
    scores = pope_scores(predictions, references)
    assert (scores["tp"], scores["fp"], scores["tn"], scores["fn"]) == (2, 1, 2, 1)
    assert scores["accuracy"] == pytest.approx(4 / 6) and scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3) and scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(3 / 6)


def test_summarize_by_hand():
    def answer(text, reference, nll, n, ok):
        return {"text": text, "metadata": {"reference": reference, "nll_sum": nll, "n_ref_tokens": n, "tf_correct": ok}}
    answers = [answer("Red.", "red", 1.0, 2, True), answer("the top left", "top left", 3.0, 3, False),
               answer("blue", "green", 4.0, 2, False), answer("No", "no", 0.5, 1, True)]
    metrics = summarize(answers)
    assert metrics["exact_match"] == pytest.approx(2 / 4)  # "Red." and "No"
    assert metrics["contains"] == pytest.approx(3 / 4)  # + "the top left"
    assert metrics["nll_per_token"] == pytest.approx(8.5 / 8)
    assert metrics["teacher_forced_accuracy"] == pytest.approx(2 / 4)
    assert metrics["pope"]["n"] == 1 and metrics["pope"]["accuracy"] == 1.0


def test_cosine_distance_by_hand():
    distance = cosine_distance([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]], [[0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(distance, [1.0, 0.0, 2.0], atol=1e-12)


def test_jsd_estimator_on_known_distributions():
    from scipy import integrate, stats
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4000, 1))
    shifted = rng.normal(size=(4000, 1)) + 1.0
    p, q = stats.norm(0, 1).pdf, stats.norm(1, 1).pdf

    def integrand(x):  # JSD of N(0,1) and N(1,1) by quadrature, from its definition
        m = 0.5 * (p(x) + q(x))
        return 0.5 * p(x) * math.log(p(x) / m) + 0.5 * q(x) * math.log(q(x) / m)
    expected = integrate.quad(integrand, -12, 13)[0]
    # sample fits of 4000 points: mean/variance error ~1/sqrt(4000), Monte Carlo error ~1e-3
    assert gaussian_jsd(base, shifted) == pytest.approx(expected, abs=0.01)
    assert gaussian_jsd(base, base) < 1e-9
    assert gaussian_jsd(base, base + 100.0) == pytest.approx(math.log(2), abs=1e-6)
    wide = rng.normal(size=(3000, 5))
    assert gaussian_jsd(wide, wide * 3.0) > gaussian_jsd(wide, wide * 1.5) > 0.01


def test_trainer_validation_matches_the_eval_cli(tmp_path):
    """`eval.every` logs val_loss / val_accuracy (right-padded collator batches) equal to what the eval
    CLI measures on the export (left-padded prompts + references) with the same weights and alpha
    (the last step's; the export records the schedule's end value); the export carries the tokenizer."""
    from test_train_fixtures import tiny_args

    from vittle_fast.train.metrics import read_metrics
    from vittle_fast.train.trainer import main
    data_dir = tmp_path / "data"
    make_uniform_dataset(data_dir)
    main(tiny_args(data_dir, tmp_path / "run", "--max_steps", "2", "eval.every=1",
                   f"eval.data_path={data_dir / 'train.json'}", "checkpoint.export_safetensors=true",
                   "vittle.alpha_end=0.5"))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [1, 2]
    metrics = cli.main(["--model", str(tmp_path / "run" / "export"), "--questions", str(data_dir / "train.json"),
                        "--images", str(data_dir), "--out", str(tmp_path / "eval"), "--max_new_tokens", "2",
                        "--no_progress", "--alpha", str(records[-1]["alpha"])])  # the alpha validated with
    assert metrics["n_with_reference"] == 16
    torch.testing.assert_close(torch.tensor(metrics["nll_per_token"]), torch.tensor(records[-1]["val_loss"]),
                               **TOL["fp32_sum"])
    assert metrics["teacher_forced_accuracy"] == records[-1]["val_accuracy"]


@pytest.mark.slow
def test_torchrun_shards_merge_to_the_single_process_answers(export, tmp_path):
    """Two gloo ranks each answer questions rank::2; rank 0 merges them in question order, equal to one
    process's answers (greedy, same batches per question up to padding). The NLL sums agree to fp32
    summation tolerance, not bitwise: the ranks run with one thread, this process with however many
    the suite was given, and a GEMM's reduction order follows the thread count."""
    import os
    import subprocess
    import sys
    run_cli(export, tmp_path / "one", "--batch_size", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "vittle_fast.eval", "--model", str(export / "export"), "--questions", str(export / "questions.jsonl"),
           "--images", str(export / "data"), "--out", str(tmp_path / "two"), "--max_new_tokens", "4",
           "--batch_size", "1", "--no_progress", "--device", "cpu"]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (read_answers(tmp_path / name / "answers.jsonl") for name in ("one", "two"))
    assert [a["question_id"] for a in two] == list(range(N_QUESTIONS))
    assert [a["text"] for a in two] == [a["text"] for a in one]
    torch.testing.assert_close(torch.tensor([a["metadata"]["nll_sum"] for a in two]),
                               torch.tensor([a["metadata"]["nll_sum"] for a in one]), **TOL["fp32_sum"])
    assert not list((tmp_path / "two").glob("answers.part*"))
