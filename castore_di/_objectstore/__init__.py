"""The object-store engine: obstore access (:mod:`.store`) and its config fields and URLs
(:mod:`.config`). Knows no service kind; obstore and zstandard load on first use.
"""
