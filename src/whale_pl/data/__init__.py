"""Data: episodes, shards and their manifest, Meta-World behavior datasets, clip DataModules.

Modules (imported on demand; nothing heavy here): ``episode`` (Episode, ActionSpace), ``shards``
(ShardWriter, verify_dataset, iter_episodes), ``policies`` (behavior-policy families),
``metaworld`` (collector), ``datamodule`` (ClipDataModule, MetaWorldDataModule), ``cli``
(``whale-data``), ``oxe`` (Open X-Embodiment conversion), ``ownership`` (which output folders a
writer may resume or replace), ``workers`` (worker processes that exit with their parent).
"""
