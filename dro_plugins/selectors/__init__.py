"""Selector kinds behind one protocol (:mod:`dro_plugins.selectors.base`): the LM selector and the retriever."""
