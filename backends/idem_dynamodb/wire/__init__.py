"""The lean path of the DynamoDB stores: the hot operations without botocore's pipeline.

``PutItem``, ``UpdateItem``, ``GetItem`` and ``DeleteItem`` (every request of claim,
complete, release, renew and a replay) are written as DynamoDB's JSON protocol 1.0 by
:mod:`.protocol`, signed by :mod:`.sigv4` with the credentials boto3 would use
(:mod:`.resolve`), sent on kept-alive connections (:mod:`.http` sync, :mod:`.aio_http`
asyncio) and retried as botocore's standard retry mode does (:mod:`.retry`). Everything
else (setup, scans, steps, transactions) stays on the store's boto3 client, built on first
need. ``lean=0`` in the URL sends everything through boto3.
"""
