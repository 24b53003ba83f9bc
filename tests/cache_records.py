"""One sha256 per record of a synthetic cache: what the build tests compare across kills,
resumes and refusals (the library's ``rcg_augment.data.datasets.record_hashes``)."""

from rcg_augment.data.datasets import record_hashes

__all__ = ["record_hashes"]
