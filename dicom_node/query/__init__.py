"""C-FIND on the node's port (Study Root Query/Retrieve FIND, STUDY level): the called AE title picks the answer.

* the node's own AE title: ordinary study-level matching over the studies the node holds
  (:mod:`~dicom_node.query.study_find`);
* the similar-case AE title: ranked similar studies for a study, or studies for a free text
  (:mod:`~dicom_node.query.similar_find`, calling the query engine).

:mod:`~dicom_node.query.matching` holds the PS3.4 C.2.2.2 matching rules as pure functions,
:mod:`~dicom_node.query.identifier` turns a request identifier into a typed query,
:mod:`~dicom_node.query.responses` builds the response identifiers and
:mod:`~dicom_node.query.service` is the one ``EVT_C_FIND`` handler (cancel, statuses, logging).
"""
