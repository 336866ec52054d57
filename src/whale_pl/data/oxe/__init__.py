"""Open X-Embodiment (RLDS / TFRecord) -> whale_pl shards, without TensorFlow.

- ``tfrecord``: TFRecord reading with CRC32C checks
- ``example_proto``: ``tf.train.Example`` parsing with plain protobuf (private descriptor pool)
- ``schema``: the TFDS ``features.json`` schema, flattened to Example keys
- ``registry``: one declarative entry per OXE dataset (camera, 7-D action mapping, language, rate)
- ``standardize``: one episode record -> standard actions, frames (crop/resize policy), language
- ``convert``: parallel, streaming, resumable conversion of a dataset or a mixture
- ``cli``: ``whale-data oxe ...`` (``main(argv)``)
"""
