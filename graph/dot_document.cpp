#include "graph/dot_document.hpp"

#include <graphviz/cgraph.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <vector>

#include "graph/error.hpp"

namespace moeflow {

namespace {
// cgraph takes char* it never writes through.
char* cstr(const std::string& s) { return const_cast<char*>(s.c_str()); }

// libcgraph's default ID discipline uses the address of a name's interned string as the object's
// ID, and writes subgraphs in ID order: the order would follow malloc, not the program. This one
// numbers names in the order they are first seen (even IDs) and anonymous objects apart (odd IDs),
// so every dump is the same byte for byte.
struct SequentialIds {
  Agraph_t* root = nullptr;
  std::map<std::string, IDTYPE> ids;
  std::vector<std::string> names;
  std::vector<char*> interned;  // cgraph's own copies: agwrite inspects the header of what print returns
  IDTYPE next_anonymous = 1;
};

void* ids_open(Agraph_t* g, Agdisc_t*) {
  auto* s = new SequentialIds;
  s->root = g;
  return s;
}

long ids_map(void* state, int, char* name, IDTYPE* id, int create) {
  auto* s = static_cast<SequentialIds*>(state);
  if (!name) {
    *id = s->next_anonymous;
    s->next_anonymous += 2;
    return 1;
  }
  auto it = s->ids.find(name);
  if (it != s->ids.end()) {
    *id = it->second;
    return 1;
  }
  if (!create) return 0;
  *id = 2 * static_cast<IDTYPE>(s->names.size() + 1);
  s->names.emplace_back(name);
  s->ids.emplace(name, *id);
  return 1;
}

long ids_alloc(void*, int, IDTYPE) { return 0; }  // no caller-chosen IDs
void ids_free(void*, int, IDTYPE) {}
char* ids_print(void* state, int, IDTYPE id) {
  auto* s = static_cast<SequentialIds*>(state);
  if (id % 2 == 1 || id == 0 || id / 2 > s->names.size()) return nullptr;
  const std::size_t index = id / 2 - 1;
  if (s->interned.size() <= index) s->interned.resize(s->names.size(), nullptr);
  if (!s->interned[index]) s->interned[index] = agstrdup(s->root, s->names[index].data());
  return s->interned[index];
}
void ids_close(void* state) { delete static_cast<SequentialIds*>(state); }
void ids_register(void*, int, void*) {}

Agiddisc_t sequential_id_disc{ids_open, ids_map, ids_alloc, ids_free, ids_print, ids_close, ids_register};
Agdisc_t deterministic_disc{&AgMemDisc, &sequential_id_disc, &AgIoDisc};

}  // namespace

struct DotDocument::Impl {
  Agraph_t* root = nullptr;
  std::map<std::string, Agraph_t*> subgraphs;
  std::map<std::pair<std::string, std::string>, Agedge_t*> edges;

  Agraph_t* scope(const std::string& subgraph) {
    if (subgraph.empty()) return root;
    auto it = subgraphs.find(subgraph);
    if (it == subgraphs.end()) throw Error(ErrorKind::bad_input, "dot: unknown subgraph '" + subgraph + "'");
    return it->second;
  }
  Agnode_t* find_node(const std::string& name) {
    Agnode_t* n = agnode(root, cstr(name), 0);
    if (!n) throw Error(ErrorKind::bad_input, "dot: edge names unknown node '" + name + "'");
    return n;
  }
  static void set(void* obj, const DotAttrs& attrs) {
    static char empty[] = "";
    for (const auto& [k, v] : attrs) agsafeset(obj, cstr(k), cstr(v), empty);
  }
};

DotDocument::DotDocument(const std::string& name) : impl_(std::make_unique<Impl>()) {
  impl_->root = agopen(cstr(name), Agdirected, &deterministic_disc);
  if (!impl_->root) throw Error(ErrorKind::resource, "dot: libcgraph could not open a graph");
}

DotDocument::~DotDocument() {
  if (impl_ && impl_->root) agclose(impl_->root);
}

void DotDocument::graph_attrs(const DotAttrs& attrs) {
  for (const auto& [k, v] : attrs) agattr(impl_->root, AGRAPH, cstr(k), cstr(v));
}
void DotDocument::node_defaults(const DotAttrs& attrs) {
  for (const auto& [k, v] : attrs) agattr(impl_->root, AGNODE, cstr(k), cstr(v));
}
void DotDocument::edge_defaults(const DotAttrs& attrs) {
  for (const auto& [k, v] : attrs) agattr(impl_->root, AGEDGE, cstr(k), cstr(v));
}

void DotDocument::subgraph(const std::string& name, const DotAttrs& attrs) {
  Agraph_t* sg = agsubg(impl_->root, cstr(name), 1);
  impl_->subgraphs[name] = sg;
  Impl::set(sg, attrs);
}

void DotDocument::node(const std::string& name, const DotAttrs& attrs, const std::string& subgraph) {
  Agnode_t* n = agnode(impl_->scope(subgraph), cstr(name), 1);
  Impl::set(n, attrs);
}

void DotDocument::edge(const std::string& tail, const std::string& head, const DotAttrs& attrs,
                       const std::string& subgraph) {
  auto key = std::make_pair(tail, head);
  auto it = impl_->edges.find(key);
  if (it != impl_->edges.end()) {
    // Merge: labels join with ", ", other attributes keep the first value.
    for (const auto& [k, v] : attrs) {
      if (k != "label") continue;
      const char* old = agget(it->second, cstr(k));
      std::string merged = (old && *old) ? std::string(old) + ", " + v : v;
      Impl::set(it->second, {{k, merged}});
    }
    return;
  }
  Agedge_t* e = agedge(impl_->scope(subgraph), impl_->find_node(tail), impl_->find_node(head), nullptr, 1);
  Impl::set(e, attrs);
  impl_->edges.emplace(key, e);
}

void DotDocument::write(std::ostream& out) const { out << str(); }

std::string DotDocument::str() const {
  char* buffer = nullptr;
  std::size_t size = 0;
  FILE* f = open_memstream(&buffer, &size);
  if (!f) throw Error(ErrorKind::resource, "dot: cannot open a memory stream");
  agwrite(impl_->root, f);
  std::fclose(f);
  std::string text(buffer, size);
  std::free(buffer);
  return text;
}

std::string dot_record_escape(const std::string& text) {
  std::string s;
  for (char c : text) {
    if (c == '{' || c == '}' || c == '|' || c == '<' || c == '>') s += '\\';
    s += c;
  }
  return s;
}

}  // namespace moeflow
