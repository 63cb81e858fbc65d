"""The PACS round trip over DICOMweb: pull films from an archive, publish results back.

``config`` (options and URL checks), ``client`` (the archive: credentials, TLS, errors without
URLs or UIDs), ``links`` (image_id → the source's UIDs, kept outside the dataset), ``pull``
(QIDO-RS + WADO-RS into a dataset, incrementally), ``sr`` and ``capture`` (the DICOM results,
built with highdicom), ``ledger`` and ``publish`` (STOW-RS of what is not yet in the archive),
``nightly`` (pull → score → publish under the output's lock). Importing the package loads none
of them.
"""
