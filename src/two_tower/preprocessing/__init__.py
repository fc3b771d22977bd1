"""Raw values to ids (vocabularies) and request-time histories."""
