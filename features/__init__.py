"""The feature-file format both stages share: see features/README.md for the written schema.

Import from the module that defines a name (`features.reader.open_features`,
`features.writer.ShardWriter`, `features.schema.ClipFeatures`...): each name has one import
path, and the light modules (`features.labels`, `features.layout`, `features.recipe`) load
without h5py for a command line that must start at once.
"""
