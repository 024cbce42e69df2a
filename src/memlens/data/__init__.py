"""Corpora (PHEE, synthetic, user JSONL/CSV), members/non-members/canaries and their manifest."""

from memlens.data.records import Record, Span, Event, read_csv, read_jsonl
from memlens.data.splits import Corpus, Split, load_corpus, make_split, find_overlaps

__all__ = ["Record", "Span", "Event", "read_csv", "read_jsonl", "Corpus", "Split", "load_corpus", "make_split",
           "find_overlaps"]
