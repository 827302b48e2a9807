import six

print("python ok, six", six.__version__)
