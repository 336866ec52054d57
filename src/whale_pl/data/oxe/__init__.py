"""Open X-Embodiment (RLDS / TFRecord) -> whale_pl shards, without TensorFlow (``whale-data oxe``)."""
