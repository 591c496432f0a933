"""Instruction data from People's Daily tags (zhjax.data.instructions, tools/build_instructions.py).

Hand-made tagged lines pin the parsing rules (names joined, compounds, documents); the real corpus checks the
splits (disjoint by document, deterministic) and that SFT preprocessing takes the output; the scorers are
checked against values computed by hand in the comments.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tools.build_instructions import main as build_tool
from zhjax.data.instructions import (
    NAMES_INSTRUCTION,
    SPLITS,
    aggregate_scores,
    build_instructions,
    format_names,
    join_person_parts,
    parse_names,
    parse_tagged_line,
    read_documents,
    score_names,
    score_segmentation,
    sentence_entities,
    split_sentences,
)
from zhjax.data.sft import build_sft_dataset

LEADER = "中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr  在/p  北京/ns  会见/v  杜/nr  中武/nr  孙/nr  传刚/nr  。/w"


def test_consecutive_person_parts_are_joined_into_one_name():
    _, units = parse_tagged_line(LEADER)
    assert sentence_entities(units) == [
        ("organization", "中共中央"), ("person", "江泽民"), ("place", "北京"), ("person", "杜中武"),
        ("person", "孙传刚"),
    ]
    assert format_names(sentence_entities(units)) == "人名：江泽民、杜中武、孙传刚\n地名：北京\n机构名：中共中央"


@pytest.mark.parametrize(
    ("parts", "names"),
    [
        (["江", "泽民"], ["江泽民"]),
        (["欧阳", "山尊"], ["欧阳山尊"]),
        (["萨米亚·侯赛因"], ["萨米亚·侯赛因"]),
        (["陈", "方", "安生"], ["陈方安生"]),  # a Hong Kong married name, not two people
        (["杜", "中武", "孙", "传刚"], ["杜中武", "孙传刚"]),
        (["潘", "跃", "王", "萍"], ["潘跃", "王萍"]),
        (["黄彪", "夏", "光辉"], ["黄彪", "夏光辉"]),
        (["祝", "有容", "让·梅泰·亚彭德"], ["祝有容", "让·梅泰·亚彭德"]),
    ],
)
def test_runs_of_person_parts_become_names(parts, names):
    assert join_person_parts(parts) == names


def test_a_bracketed_compound_is_one_name_and_its_words_stay_segmented():
    line = "[中央/n  人民/n  广播/vn  电台/n]nt  和/c  [北京/ns  大学/n]nt  的/u  [/w  记者/n  ]/w"
    _, units = parse_tagged_line(line)
    assert sentence_entities(units) == [("organization", "中央人民广播电台"), ("organization", "北京大学")]
    assert [w for u in units for w in u.words] == ["中央", "人民", "广播", "电台", "和", "北京", "大学", "的", "[",
                                                   "记者", "]"]
    with pytest.raises(ValueError, match=r"corpus.txt:7: token '孤词' is not word/tag"):
        parse_tagged_line("好/a  孤词", where="corpus.txt:7")


def test_sentences_end_after_closing_quotes():
    _, units = parse_tagged_line("他/r  说/v  ：/w  “/w  好/a  。/w  ”/w  我们/r  走/v  吧/y  ！/w  再见/v")
    assert ["".join(u.text for u in s) for s in split_sentences(units)] == ["他说：“好。”", "我们走吧！", "再见"]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_documents_without_ids_run_from_headline_to_headline(tmp_path):
    corpus = write(tmp_path / "c.txt", [
        "北京/ns  举行/v  新年/t  音乐会/n",           # headline: a document starts
        "本报/r  北京/ns  １月/t  １日/t  讯/Ng  。/w",
        "音乐会/n  很/d  成功/a  。/w",
        "李/nr  鹏/nr  在/p  北京/ns  考察/v  企业/n",  # headline after a finished sentence: a new document
        "李/nr  鹏/nr  说/v  ：/w",
        "要/v  搞好/v  改革/vn  。/w",
    ])
    documents, rule = read_documents(corpus)
    assert rule == "headlines"
    assert [d.lines for d in documents] == [[0, 1, 2], [3, 4, 5]]


def test_documents_with_article_ids_share_the_date_page_article_prefix(tmp_path):
    corpus = write(tmp_path / "c.txt", [
        "19980101-01-001-001/m  迈向/v  新/a  世纪/n",
        "19980101-01-001-002/m  江/nr  泽民/nr  。/w",
        "",
        "19980101-01-002-001/m  北京/ns  举行/v  音乐会/n  。/w",
    ])
    documents, rule = read_documents(corpus)
    assert rule == "article ids"
    assert [(d.id, d.lines) for d in documents] == [("19980101-01-001", [0, 1]), ("19980101-01-002", [3])]
    assert documents[0].raw_paragraphs() == ["迈向新世纪", "江泽民。"]


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("instructions") / "data"
    summary = build_instructions(assets.corpus_tagged, out, max_examples=1000, seed=0)
    data = {s: json.loads((out / f"{s}.json").read_text(encoding="utf-8")) for s in SPLITS}
    return summary, out, data


def test_splits_are_disjoint_by_document_and_sized_as_asked(built, assets):
    summary, out, data = built
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    docs = {s: set(manifest["split_documents"][s]) for s in SPLITS}
    assert not (docs["train"] & docs["validation"] or docs["train"] & docs["test"] or docs["validation"] & docs["test"])
    for split in SPLITS:
        assert {r["doc"] for r in data[split]} <= docs[split]
    assert [len(data[s]) for s in SPLITS] == [800, 100, 100]
    assert summary.counts["train"] == {"names": 400, "segmentation": 400}
    assert summary.documents == "headlines" and sum(summary.num_documents.values()) > 2000
    inputs = {s: {r["input"] for r in data[s]} for s in SPLITS}
    assert not (inputs["train"] & inputs["test"] or inputs["train"] & inputs["validation"])
    # the split's raw text covers the corpus exactly once, in the same paragraphs
    paragraphs = [line.rstrip("\n") for line in open(assets.corpus_text, encoding="utf-8") if line.strip()]
    split_text = [line for s in SPLITS for line in (out / "text" / f"{s}.txt").read_text(encoding="utf-8").splitlines()]
    assert sorted(split_text) == sorted(paragraphs)


def test_build_is_deterministic_and_the_seed_changes_only_the_sampling(built, assets, tmp_path):
    _, out, data = built
    again = build_instructions(assets.corpus_tagged, tmp_path / "again", max_examples=1000, seed=0)
    assert again.files["train"].read_bytes() == (out / "train.json").read_bytes()
    other = build_instructions(assets.corpus_tagged, tmp_path / "other", max_examples=1000, seed=1)
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "other")]
    assert manifests[0]["split_documents"] == manifests[1]["split_documents"]
    assert other.files["train"].read_bytes() != (out / "train.json").read_bytes()


def test_answers_are_well_formed_and_score_perfectly_against_themselves(built):
    _, _, data = built
    records = [r for s in SPLITS for r in data[s]]
    names = [r for r in records if r["task"] == "names"]
    segmentation = [r for r in records if r["task"] == "segmentation"]
    assert all(r["instruction"] == NAMES_INSTRUCTION for r in names)
    assert sum(r["output"] != "人名：无\n地名：无\n机构名：无" for r in names) == pytest.approx(0.8 * len(names), abs=2)
    assert all(parse_names(r["output"])[1] for r in names)
    assert aggregate_scores([score_names(r["output"], r["output"]) for r in names])["f1"] == 1.0
    for r in segmentation:
        assert r["output"].replace(" ", "") == r["input"]
        assert score_segmentation(r["output"], r["output"])["exact_match"] == 1.0


def test_output_loads_with_the_sft_dataset_builder(built, assets):
    _, out, data = built
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_dir)
    rows, summary = build_sft_dataset(out / "validation.json", tokenizer, "alpaca", max_seq_length=512, pack=False)
    assert summary.records == summary.examples == len(data["validation"]) == len(rows)
    assert summary.counts == {"kept": len(rows)}  # nothing truncated or dropped


def test_name_scores_on_hand_made_answers():
    gold = "人名：江泽民、李鹏\n地名：北京\n机构名：无"
    # gold {江泽民, 李鹏 (person), 北京 (place)}; pred {江泽民, 北京, 上海 (place), 新华社 (organization)}
    # tp 2: precision 2/4, recall 2/3, F1 = 2 * 0.5 * 2/3 / (0.5 + 2/3) = 4/7
    s = score_names("人名：江泽民\n地名：北京、上海\n机构名：新华社", gold)
    assert (s["tp"], s["n_pred"], s["n_gold"], s["exact_match"]) == (2, 4, 3, 0.0)
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((0.5, 2 / 3, 4 / 7))
    # same names in another order, ":" instead of "：", a trailing full stop: an exact match
    assert score_names("地名: 北京。\n人名：李鹏，江泽民\n机构名：无", gold)["exact_match"] == 1.0
    # a person listed as a place counts as wrong: tp 1 (李鹏), precision 1/2, recall 1/3, F1 0.4
    assert score_names("人名：李鹏\n地名：江泽民\n机构名：无", gold)["f1"] == pytest.approx(0.4)
    none = "人名：无\n地名：无\n机构名：无"
    assert score_names(none, none) == {"exact_match": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0,
                                       "tp": 0, "n_pred": 0, "n_gold": 0}
    assert score_names("我不知道。", none)["exact_match"] == 0.0  # not well formed
    # micro average over the first two examples: tp 2 + 3, predicted 4 + 3, gold 3 + 3 -> P 5/7, R 5/6
    total = aggregate_scores([s, score_names("地名: 北京。\n人名：李鹏，江泽民\n机构名：无", gold)])
    assert total["exact_match"] == 0.5
    assert (total["precision"], total["recall"], total["f1"]) == pytest.approx((5 / 7, 5 / 6, 10 / 13))


def test_segmentation_scores_on_hand_made_answers():
    gold = "中国 人民 站 起来 了"
    # gold boundaries after characters 2, 4, 5, 7 (counting from 1); pred "中国人民 站起来 了" has {4, 7}: P 1, R 1/2, F1 2/3
    # words: gold (0,2) (2,4) (4,5) (5,7) (7,8), pred (0,4) (4,7) (7,8): 1 right, P 1/3, R 1/5, F1 1/4
    s = score_segmentation("中国人民 站起来 了", gold)
    assert (s["tp"], s["n_pred"], s["n_gold"], s["exact_match"]) == (2, 2, 4, 0.0)
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert (s["word_precision"], s["word_recall"], s["word_f1"]) == pytest.approx((1 / 3, 1 / 5, 1 / 4))
    assert score_segmentation(" 中国  人民 站 起来 了\n", gold)["exact_match"] == 1.0
    # a changed character: "我 爱 南京" vs gold "我 爱 北京": the boundaries follow 我 and 爱, which align with
    # gold characters that end words: P 1, R 1; words 我 and 爱 right, 南京 not: word P 2/3, R 2/3
    t = score_segmentation("我 爱 南京", "我 爱 北京")
    assert (t["precision"], t["recall"], t["word_f1"]) == pytest.approx((1.0, 1.0, 2 / 3))
    # a dropped character: pred "我 北京" vs gold "我 爱 北京": the one boundary follows 我 (right); the gold
    # boundary after 爱 is missed: P 1, R 1/2; words 我 and 北京 right: word P 2/2, R 2/3
    u = score_segmentation("我 北京", "我 爱 北京")
    assert (u["precision"], u["recall"], u["word_precision"], u["word_recall"]) == pytest.approx((1, 0.5, 1, 2 / 3))
    # one-word sentences have no boundaries: right when the answer has none either
    assert score_segmentation("你好", "你好")["f1"] == 1.0 and score_segmentation("你 好", "你好")["f1"] == 0.0


def test_tool_writes_the_splits_and_prints_examples(tmp_path, capsys):
    lines = [LEADER, "李/nr  鹏/nr  在/p  北京/ns  考察/v  企业/n", "国务院/nt  总理/n  李/nr  鹏/nr  考察/v  企业/n  。/w"]
    corpus = write(tmp_path / "tagged.txt", lines * 3)
    assert build_tool(["--tagged", str(corpus), "--out", str(tmp_path / "out"), "--max-examples", "20"]) == 0
    out = capsys.readouterr().out
    assert "documents delimited by headlines" in out and "names example:" in out
    assert build_tool(["--tagged", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 1
    assert "build_instructions:" in capsys.readouterr().err
