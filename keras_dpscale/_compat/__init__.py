"""The one door to the private APIs of Keras and TensorFlow.

Every private name keras_dpscale relies on is imported in `keras_private`
or `tf_private`, with the versions it was checked against, so that a new
Keras or TensorFlow breaks in one place, loudly, at import.
"""
