#include <wick/wick.h>

#include <iostream>

int main() {
  std::cout << "wick " << wick::version() << " found and linked\n";
  return 0;
}
