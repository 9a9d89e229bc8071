# wick_python_executable(<var>): the Python with torch that the bench's peers
# and the tests' references (tests/py/reference.py) run: the venv's
# (WickFindTorch sets WICK_PYTHON when it found Torch through it), else
# python3 from PATH. The environment variable WICK_PYTHON overrides it at run
# time (and wick-bench's --python).
function(wick_python_executable var)
  if(DEFINED WICK_PYTHON AND EXISTS "${WICK_PYTHON}")
    set(python "${WICK_PYTHON}")
  else()
    find_package(Python3 COMPONENTS Interpreter QUIET)
    if(Python3_Interpreter_FOUND)
      set(python "${Python3_EXECUTABLE}")
    else()
      set(python "python3")
    endif()
  endif()
  set(${var} "${python}" PARENT_SCOPE)
endfunction()
